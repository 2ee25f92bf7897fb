"""The backbone fingerprint is the weights' content: one value per backbone whatever the thread
count, file format, device or dtype it is loaded in; any change to a weight changes it."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vlprompt import load_clip, save_clip, tokenize
from vlprompt.clip.fingerprint import (backbone_fingerprint, fingerprint_matches,
                                       legacy_state_checksum, state_checksum, weights_fingerprint)

SRC = str(Path(__file__).resolve().parents[2] / "src")
# torch may cap OMP_NUM_THREADS at the core count on start, so the probe also sets it explicitly
PROBE = ("import json, os, sys, torch; from vlprompt import load_clip; "
         "from vlprompt.clip.fingerprint import backbone_fingerprint, legacy_state_checksum; "
         "torch.set_num_threads(int(os.environ['OMP_NUM_THREADS'])); "
         "m = load_clip(sys.argv[1]); print(json.dumps([torch.get_num_threads(), "
         "backbone_fingerprint(m), legacy_state_checksum(m)]))")


def _probe(path: Path, threads: int) -> tuple[int, str, str]:
    """Load ``path`` in a fresh process with ``threads`` threads, set once as in real runs."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": SRC}
    out = subprocess.run([sys.executable, "-c", PROBE, str(path)], env=env, check=True,
                         capture_output=True, text=True, timeout=300)
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def _trace(clip) -> torch.jit.ScriptModule:
    return torch.jit.trace(clip, (torch.zeros(1, 3, clip.image_size, clip.image_size),
                                  tokenize(["a"])), check_trace=False)


def _openai_style_fp16(clip):
    """(fp32 reference with fp16-representable weights, TorchScript archive of it holding
    matrices in fp16 and 1-D weights in fp32, as OpenAI's archives do)."""
    with torch.no_grad():
        for p in clip.parameters():
            if p.dim() >= 2:
                p.copy_(p.half().float())
    traced = _trace(clip)
    for _, p in traced.named_parameters():
        if p.dim() >= 2:
            p.data = p.data.half()
    return clip, traced


def test_fingerprint_format(tiny_clip):
    value = backbone_fingerprint(tiny_clip)
    scheme, digest = value.split(":")
    assert scheme == "sha256" and len(digest) == 64 and int(digest, 16) >= 0


def test_thread_count_does_not_change_fingerprint(tiny_clip, tmp_path):
    path = save_clip(tiny_clip, tmp_path / "clip.safetensors")
    one = backbone_fingerprint(load_clip(path))
    torch.set_num_threads(4)
    try:
        assert backbone_fingerprint(load_clip(path)) == one
    finally:
        torch.set_num_threads(1)
    threads, four, legacy = _probe(path, 4)
    assert threads == 4 and four == one
    # the legacy checksum sums floats, so it may differ between thread counts: never asserted
    assert len(legacy) == 16


def test_every_format_gives_one_fingerprint(tiny_clip, tmp_path):
    expected = backbone_fingerprint(tiny_clip)
    state = tiny_clip.state_dict()
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}},
               tmp_path / "nested.pth")
    torch.save(state, tmp_path / "weights.bin")
    _trace(tiny_clip).save(str(tmp_path / "ViT-tiny.pt"))
    paths = [save_clip(tiny_clip, tmp_path / "clip.pt"),
             save_clip(tiny_clip, tmp_path / "clip.safetensors"),
             tmp_path / "nested.pth", tmp_path / "weights.bin", tmp_path / "ViT-tiny.pt"]
    for path in paths:
        assert backbone_fingerprint(load_clip(path)) == expected, path.name


def test_fp16_archive_matches_fp32_copies_of_its_weights(tiny_clip, tmp_path):
    reference, traced = _openai_style_fp16(tiny_clip)
    traced.save(str(tmp_path / "ViT-fp16.pt"))
    archive = load_clip(tmp_path / "ViT-fp16.pt")
    assert archive.source_dtype == "float16"
    expected = backbone_fingerprint(reference)
    assert backbone_fingerprint(archive) == expected
    copy = load_clip(save_clip(archive, tmp_path / "copy.safetensors"))
    assert copy.source_dtype == "float32" and backbone_fingerprint(copy) == expected


def test_fp16_rounded_copy_is_another_backbone(tiny_clip, tmp_path):
    original = backbone_fingerprint(tiny_clip)
    half = tiny_clip.state_dict()
    torch.save({k: v.half() for k, v in half.items()}, tmp_path / "half.pt")
    rounded = load_clip(tmp_path / "half.pt")
    assert rounded.source_dtype == "float16"
    assert backbone_fingerprint(rounded) != original


def test_hf_folder_matches_its_other_formats(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=64, intermediate_size=256,
                         num_hidden_layers=1, num_attention_heads=1, max_position_embeddings=77,
                         hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=1,
                           num_attention_heads=1, image_size=32, patch_size=8,
                           hidden_act="quick_gelu"),
        projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(cfg).save_pretrained(tmp_path / "hf")
    clip = load_clip(tmp_path / "hf")
    expected = backbone_fingerprint(clip)
    for name in ("clip.pt", "clip.safetensors"):
        path = save_clip(clip, tmp_path / name)
        assert backbone_fingerprint(load_clip(path)) == expected


def test_dtype_and_device_of_the_load_keep_the_file_fingerprint(tiny_clip, tmp_path):
    path = save_clip(tiny_clip, tmp_path / "clip.safetensors")
    expected = backbone_fingerprint(tiny_clip)
    bf16 = load_clip(path, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert backbone_fingerprint(bf16) == expected
    assert backbone_fingerprint(bf16, recompute=True) == expected  # weights as loaded
    with torch.no_grad():
        bf16.visual.proj[0, 0] += 1
    assert backbone_fingerprint(bf16) != expected
    assert backbone_fingerprint(bf16, recompute=True) != expected


def test_in_place_edit_changes_cached_and_recomputed_value(tiny_clip):
    before = backbone_fingerprint(tiny_clip)
    with torch.no_grad():
        tiny_clip.transformer.resblocks[1].mlp.c_fc.weight[3, 4] += 1e-3
    assert backbone_fingerprint(tiny_clip) != before  # the version counter moved
    after = backbone_fingerprint(tiny_clip, recompute=True)
    assert after != before and after == backbone_fingerprint(tiny_clip)


def test_edits_through_data_need_recompute(tiny_clip):
    before = backbone_fingerprint(tiny_clip)
    tiny_clip.ln_final.weight.data.add_(1)  # .data bypasses version counters (documented)
    assert backbone_fingerprint(tiny_clip, recompute=True) != before


def test_load_state_dict_invalidates_cache(tiny_clip, tiny_config):
    from vlprompt.clip.model import build_clip

    before = backbone_fingerprint(tiny_clip)
    torch.manual_seed(1)
    tiny_clip.load_state_dict(build_clip(tiny_config).state_dict())
    assert backbone_fingerprint(tiny_clip) != before


def test_cache_is_instant(tiny_clip):
    start = time.perf_counter()
    backbone_fingerprint(tiny_clip)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(10):
        backbone_fingerprint(tiny_clip)
    warm = (time.perf_counter() - start) / 10
    assert warm < 0.01 and warm < cold


def test_weights_fingerprint_is_exact_and_canonical():
    a = {"w": torch.arange(6.0).reshape(2, 3), "s": torch.tensor(1.5),
         "b": torch.zeros(2, dtype=torch.bfloat16)}
    value = weights_fingerprint(a)
    assert weights_fingerprint(dict(reversed(list(a.items())))) == value  # key order
    assert weights_fingerprint({**a, "w": a["w"].t().contiguous().t()}) == value  # strides
    assert weights_fingerprint({**a, "w": a["w"].reshape(3, 2)}) != value  # shape
    assert weights_fingerprint({**a, "w": a["w"].double()}) != value  # dtype
    assert weights_fingerprint({**a, "s": torch.tensor(1.5000001)}) != value  # one ulp
    assert weights_fingerprint({"v": a["w"]}) != weights_fingerprint({"w": a["w"]})  # names
    with pytest.raises(TypeError, match="'x' is a int"):
        weights_fingerprint({"x": 3})


def test_legacy_checksum_and_matching(tiny_clip):
    legacy = legacy_state_checksum(tiny_clip)
    assert len(legacy) == 16
    with pytest.warns(DeprecationWarning):
        assert state_checksum(tiny_clip) == legacy
    assert fingerprint_matches(tiny_clip, legacy)
    assert fingerprint_matches(tiny_clip, backbone_fingerprint(tiny_clip))
    assert not fingerprint_matches(tiny_clip, "sha256:" + "0" * 64)
    with pytest.raises(ValueError, match="unknown backbone fingerprint"):
        fingerprint_matches(tiny_clip, "md5:abc")


def test_hashing_on_several_threads_gives_the_same_value(tiny_clip, monkeypatch):
    from vlprompt.clip import fingerprint

    expected = backbone_fingerprint(tiny_clip)
    monkeypatch.setattr(fingerprint, "_PARALLEL_MIN_BYTES", 0)
    torch.set_num_threads(3)
    try:
        assert fingerprint._workers(list(tiny_clip.state_dict().values())) == 3
        assert backbone_fingerprint(tiny_clip, recompute=True) == expected
    finally:
        torch.set_num_threads(1)
