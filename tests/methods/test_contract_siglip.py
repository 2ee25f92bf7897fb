"""The method contract (``test_contract.py``) on a tiny SigLIP: every method whose ``requires``
the SigLIP core offers trains only its own tensors, leaves the model untouched, learns the colour
task, switches classes and round-trips its checkpoint; the others refuse in one line that names
the method and the backbones it supports."""

from __future__ import annotations

import pytest

from vlprompt.methods import get_method, list_methods

from . import test_contract as contract
from .conftest import CLASSNAMES

pytest.importorskip("sentencepiece")

METHODS = list_methods()
#: methods whose mechanism applies to SigLIP's towers and that must run on it (issue 13)
MUST_RUN = {"zeroshot", "coop", "cocoop", "kgcoop", "maple", "ivlp", "vpt", "promptsrc", "dpt",
            "comma", "tomml", "mupl"}


def _supported(name: str, clip) -> bool:
    return set(get_method(name).requires) <= set(clip.capabilities)


def test_the_required_methods_run_on_siglip(tiny_siglip):
    refused = sorted(n for n in MUST_RUN & set(METHODS) if not _supported(n, tiny_siglip))
    assert not refused, f"refused on SigLIP: {refused}"


@pytest.mark.parametrize("name", METHODS)
def test_siglip_contract(name, tiny_siglip, tmp_path):
    if not _supported(name, tiny_siglip):
        with pytest.raises(ValueError) as err:
            contract._build(name, tiny_siglip)
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"{name} ")
        assert "SigLIP" in message and "ViT" in message
        return
    contract.test_gradients_reach_exactly_the_trainable_tensors(name, tiny_siglip)
    contract.test_frozen_clip_unchanged_after_optimiser_step(name, tiny_siglip)
    contract.test_learns_a_synthetic_task(name, tiny_siglip)
    contract.test_set_classnames_switches_classes(name, tiny_siglip)
    contract.test_trainable_state_dict_round_trips_bit_exactly(name, tiny_siglip, tmp_path)


def test_coop_prompt_sits_at_position_zero_on_siglip(tiny_siglip):
    """No start token: CoOp's context takes positions 0..M-1, the class words follow, and the
    feature is read at the last position (SigLIP's pooling)."""
    import torch

    method = contract._build("coop", tiny_siglip)
    prompts = method.prompts
    M = prompts.n_ctx
    assert prompts.prompt_start == 0
    assert (prompts.eot_indices == tiny_siglip.context_length - 1).all()
    ctx = torch.randn(M, tiny_siglip.text_width)
    emb = prompts.assemble(ctx)
    torch.testing.assert_close(emb[:, :M], ctx.expand(len(CLASSNAMES), -1, -1))
    torch.testing.assert_close(emb[:, M:], prompts.embeddings[:, M:])
