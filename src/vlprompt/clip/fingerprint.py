"""Backbone fingerprints: a cryptographic hash of the weights' exact bytes.

A checkpoint records the fingerprint of the CLIP it was trained on, and training verifies the
frozen CLIP is unchanged. Both need a value that depends on the weights only — never on the
thread count, the device or the file format — so it hashes bytes, not float sums.

Canonical form (scheme ``sha256``, version ``vlprompt-weights-v1``): keys in sorted order; for
each tensor a JSON header ``[name, dtype, shape, nbytes]`` and the SHA-256 of its contiguous
little-endian CPU bytes; the fingerprint is the SHA-256 of that sequence. Per-tensor digests let
large models be hashed on several threads with the same result.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor

SCHEME = "sha256"
_DOMAIN = b"vlprompt-weights-v1\n"
_CACHE_ATTR = "_vlprompt_fingerprint"
_LEGACY = re.compile(r"[0-9a-f]{16}")
#: below this many bytes one thread hashes faster than a pool starts
_PARALLEL_MIN_BYTES = 64 << 20


def _tensor_bytes(t: Tensor) -> memoryview:
    """Zero-copy view of a tensor's bytes (CPU, contiguous; any dtype incl. bfloat16, 0-dim)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def _digest(t: Tensor) -> bytes:
    return hashlib.sha256(_tensor_bytes(t)).digest()


def _workers(tensors: list[Tensor]) -> int:
    """Hash threads: torch's intra-op thread count (the user's CPU budget), 1 for small models."""
    total = sum(t.numel() * t.element_size() for t in tensors)
    return 1 if total < _PARALLEL_MIN_BYTES else max(1, min(8, torch.get_num_threads()))


def _fingerprint(state: Mapping[str, Tensor], transform: Callable[[Tensor], Tensor]) -> str:
    """The canonical hash of ``transform(tensor)`` for every entry of ``state``."""
    items = sorted(state.items())
    for name, t in items:
        if not isinstance(t, Tensor):
            raise TypeError(f"weights_fingerprint: {name!r} is a {type(t).__name__}, not a tensor")
    tensors = [t for _, t in items]

    def one(t: Tensor) -> tuple[str, list[int], int, bytes]:
        t = transform(t)
        return (str(t.dtype).removeprefix("torch."), list(t.shape),
                t.numel() * t.element_size(), _digest(t))

    workers = _workers(tensors)
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(one, tensors))
    else:
        parts = [one(t) for t in tensors]
    h = hashlib.sha256(_DOMAIN)
    for (name, _), (dtype, shape, nbytes, digest) in zip(items, parts):
        h.update(json.dumps([name, dtype, shape, nbytes]).encode() + b"\n")
        h.update(digest)
    return f"{SCHEME}:{h.hexdigest()}"


def weights_fingerprint(state: Mapping[str, Tensor]) -> str:
    """``"sha256:<64 hex>"`` of the tensors exactly as given (names, dtypes, shapes, bytes)."""
    return _fingerprint(state, lambda t: t)


def _as_fp32(t: Tensor) -> Tensor:
    """vlprompt's reference semantics are fp32: floating tensors are compared as float32 (on the
    CPU, after the transfer, so a bf16 GPU tensor moves half the bytes)."""
    t = t.detach().cpu()
    return t.float() if t.is_floating_point() else t


def _canonical_digest(model: torch.nn.Module) -> str:
    """Fingerprint of the model's current weights with floating tensors as float32."""
    with torch.no_grad():
        return _fingerprint(model.state_dict(), _as_fp32)


# --------------------------------------------------------------------------- cache on the model
@dataclass(frozen=True)
class _Cached:
    snapshot: Optional[tuple]  # cheap identity of every tensor when cached; None: never valid
    fingerprint: str  # what backbone_fingerprint returns
    anchor: str  # canonical digest of the tensors at snapshot time (== fingerprint unless the
    #              model was cast after load_clip fingerprinted its fp32 weights)


def _snapshot(model: torch.nn.Module) -> Optional[tuple]:
    """(name, version, address, dtype, device, shape, stride) of every tensor: in-place edits bump
    the version, replaced or moved tensors change the address. None for inference tensors."""
    try:
        return tuple((name, t._version, t.data_ptr(), t.dtype, t.device, tuple(t.shape),
                      tuple(t.stride())) for name, t in model.state_dict(keep_vars=True).items()
                     if isinstance(t, Tensor))
    except RuntimeError:  # inference-mode tensors track no version
        return None


def _store(model: torch.nn.Module, fingerprint: str, anchor: str) -> None:
    object.__setattr__(model, _CACHE_ATTR, _Cached(_snapshot(model), fingerprint, anchor))


def attach_fingerprint(model: torch.nn.Module, fingerprint: str,
                       anchor: Optional[str] = None) -> None:
    """Record ``fingerprint`` for the model's current weights (``load_clip`` calls this after
    moving the model, with the fingerprint of the fp32 file weights). ``anchor`` is the canonical
    digest of the current weights; it defaults to ``fingerprint`` (weights still fp32)."""
    _store(model, fingerprint, anchor or fingerprint)


def backbone_fingerprint(model: torch.nn.Module, recompute: bool = False) -> str:
    """The backbone's identity: ``"sha256:<64 hex>"`` of its weights as float32.

    The same weights give one value whatever the file format (OpenAI fp16 TorchScript, ``.pt``,
    ``.safetensors``, Hugging Face folder), thread count or device; a model that ``load_clip``
    cast to bf16/fp16 keeps its file's fingerprint while its weights stay as loaded. Cached on the
    model, keyed by each tensor's version counter and address, so the second call is instant and
    ``torch.no_grad()`` in-place edits or ``load_state_dict`` invalidate it. Edits through
    ``param.data`` bypass version counters (the cache may then be stale): ``recompute=True``
    re-hashes every tensor and is exact — use it to verify a frozen CLIP is unchanged.
    """
    cached = getattr(model, _CACHE_ATTR, None)
    if not recompute and cached is not None and cached.snapshot is not None \
            and cached.snapshot == _snapshot(model):
        return cached.fingerprint
    digest = _canonical_digest(model)
    fingerprint = cached.fingerprint if cached is not None and cached.anchor == digest else digest
    _store(model, fingerprint, digest)
    return fingerprint


def fingerprint_matches(model: torch.nn.Module, expected: str) -> bool:
    """Compare with a stored value of either scheme: ``sha256:...`` (backbone_fingerprint) or the
    16-hex legacy checksum of checkpoints written before it (thread-count dependent)."""
    if expected.startswith(f"{SCHEME}:"):
        return backbone_fingerprint(model) == expected
    if _LEGACY.fullmatch(expected):
        return legacy_state_checksum(model) == expected
    raise ValueError(f"unknown backbone fingerprint {expected!r}: expected 'sha256:<64 hex>' "
                     f"or a 16-hex legacy checksum; re-create the checkpoint with this vlprompt")


def source_dtype(tensors: Iterable[Tensor]) -> str:
    """The floating dtype holding most elements (``"float16"`` for OpenAI archives, whose layer
    norms stay fp32), so messages can say what the file holds; ``"none"`` without floats."""
    counts: dict[str, int] = {}
    for t in tensors:
        if t.is_floating_point():
            name = str(t.dtype).removeprefix("torch.")
            counts[name] = counts.get(name, 0) + t.numel()
    return max(counts, key=counts.__getitem__) if counts else "none"


# --------------------------------------------------------------------------- legacy
def legacy_state_checksum(model: torch.nn.Module) -> str:
    """The pre-fingerprint checksum (float sums per tensor, hashed; 16 hex), kept bit-for-bit so
    checkpoints that stored it can still be checked. Its value depends on the thread count and
    device: never write it into new checkpoints."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            flat = t.detach().float().flatten()
            stats = torch.stack([flat.sum(), flat.abs().sum(), (flat * flat).sum(),
                                 flat[:: max(1, flat.numel() // 97)].sum()])
            h.update(name.encode())
            h.update(stats.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def state_checksum(model: torch.nn.Module) -> str:
    """Deprecated: ``legacy_state_checksum``. New code uses ``backbone_fingerprint``."""
    warnings.warn("state_checksum is deprecated: use backbone_fingerprint (new checkpoints) or "
                  "legacy_state_checksum (old ones)", DeprecationWarning, stacklevel=2)
    return legacy_state_checksum(model)
