"""Process-wide performance switches (DESIGN.md "Performance, by design", issue 14).

Every optimisation of vlprompt that is not a method's hyperparameter has a switch here, so it can
be turned off to measure what it buys (``vlprompt bench --compare-reference``) or to check that it
is exact (tests). The defaults are the optimised product; ``reference_mode()`` turns them all
off at once, giving the computation the papers' official code performs (77-token text passes, no
feature caching, one text-tower call per image for instance-conditional prompts).

This module imports nothing from vlprompt, so every layer (``clip`` included) may read it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator


@dataclasses.dataclass
class Switches:
    """The switches. Exact ones default on; ``activation_checkpointing`` trades time for memory
    (set by the engine from ``train.activation_checkpointing``)."""

    #: run the text tower on the shortest length covering every EOT (exact: causal mask)
    truncate_text: bool = True
    #: reuse class text features across evaluation batches while nothing can change them
    cache_text_features: bool = True
    #: instance-conditional prompts (CoCoOp, TOMML, MuPL): B x C prompts in memory-bounded
    #: chunks; off: one text-tower call per image (the official batch-1 loop)
    batched_conditional_text: bool = True
    #: recompute the activations of transformer blocks that need gradients in backward
    activation_checkpointing: bool = False
    #: run the transformer blocks through ``torch.compile`` (eager fallback with a warning)
    compile_blocks: bool = False


#: the live switches (read at call time by the code they govern)
SWITCHES = Switches()

#: what reference mode sets: every exact optimisation off
REFERENCE = {"truncate_text": False, "cache_text_features": False,
             "batched_conditional_text": False}


@contextlib.contextmanager
def switches(**values: bool) -> Iterator[Switches]:
    """Set switches for the duration of a ``with`` block, restoring them afterwards."""
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(Switches)})
    if unknown:
        raise ValueError(f"unknown performance switch(es) {', '.join(unknown)}")
    old = {k: getattr(SWITCHES, k) for k in values}
    try:
        for k, v in values.items():
            setattr(SWITCHES, k, bool(v))
        yield SWITCHES
    finally:
        for k, v in old.items():
            setattr(SWITCHES, k, v)


def reference_mode() -> contextlib.AbstractContextManager:
    """Every exact optimisation off: the official code's computation (for side-by-side
    benchmarks and exactness tests)."""
    return switches(**REFERENCE)
