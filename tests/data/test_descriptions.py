"""LLM class descriptions (``vlprompt.data.descriptions``): the official ``gpt_file`` format, file
names per dataset, class-name matching, clear errors, and the on-disk feature cache (per backbone
fingerprint and content, atomic, one computation for parallel jobs). The files are written here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from vlprompt.clip.load import cache_dir, save_clip
from vlprompt.clip.model import build_clip
from vlprompt.clip.tokenizer import tokenize
from vlprompt.data import descriptions as D
from vlprompt.data.descriptions import (description_features, load_descriptions,
                                        write_descriptions)

NAMES = ["Annual_Crop_Land", "Forest", "sea or lake"]
TEXTS = {"Annual Crop Land": ["fields in rows.", "green and brown squares."],
         "Forest": ["dark green trees.", "a dense canopy."],
         "Sea or Lake": ["blue water.", "a smooth dark surface."]}


def _write(folder, dataset="eurosat", data=TEXTS):
    return write_descriptions(folder, dataset, data)


def test_official_format_names_and_matching(tmp_path):
    path = _write(tmp_path)
    assert path.name == "eurosat_prompt.json"
    assert json.loads(path.read_text())["Forest"] == TEXTS["Forest"]
    out = load_descriptions(tmp_path, "eurosat", NAMES)
    # "_" -> space exactly; "sea or lake" matches "Sea or Lake" ignoring case
    assert out == [TEXTS["Annual Crop Land"], TEXTS["Forest"], TEXTS["Sea or Lake"]]
    assert load_descriptions(tmp_path, "EuroSAT", NAMES) == out  # Dassl's dataset name
    assert load_descriptions(path, "anything", NAMES) == out  # the file itself
    # official file stems, and ImageNet's file for its variants
    assert D.description_file_names("fgvc_aircraft") == ["fgvc_prompt.json"]
    assert D.description_file_names("Caltech101") == ["caltech_prompt.json"]
    assert D.description_file_names("imagenet_sketch") == ["imagenet_sketch_prompt.json",
                                                          "imagenet_prompt.json"]
    assert D.description_file_names("my_birds") == ["my_birds_prompt.json"]


def test_imagenet_variants_and_gpt_file_subfolder(tmp_path):
    (tmp_path / "gpt_file").mkdir()
    _write(tmp_path / "gpt_file", "imagenet", {"goldfish": ["an orange fish."]})
    assert load_descriptions(tmp_path, "imagenetv2", ["goldfish"]) == [["an orange fish."]]
    assert load_descriptions(tmp_path, "imagenet_a", ["goldfish"]) == [["an orange fish."]]


def test_flowers_lotus_alias(tmp_path):
    _write(tmp_path, "oxford_flowers", {"lotus": ["a pink flower on water."]})
    assert load_descriptions(tmp_path, "oxford_flowers", ["lotus lotus"]) == [
        ["a pink flower on water."]]


def test_errors_name_the_file_and_the_source(tmp_path, monkeypatch):
    monkeypatch.delenv(D.ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError, match=r"descriptions=PATH.*VLPROMPT_DESCRIPTIONS"):
        load_descriptions(None, "eurosat", NAMES)
    with pytest.raises(FileNotFoundError) as err:
        load_descriptions(tmp_path, "fgvc_aircraft", ["707-320"])
    msg = str(err.value)
    assert str(tmp_path / "fgvc_prompt.json") in msg and "ShuvenduRoy/CoPrompt" in msg
    assert "\n" not in msg
    with pytest.raises(FileNotFoundError, match=r"imagenet_r_prompt\.json \(or imagenet_prompt"):
        load_descriptions(tmp_path, "imagenet_r", ["goldfish"])
    _write(tmp_path)
    with pytest.raises(ValueError, match=r"no descriptions for 1 class\(es\) of eurosat: 'River'"):
        load_descriptions(tmp_path, "eurosat", NAMES + ["River"])
    (tmp_path / "dtd_prompt.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_descriptions(tmp_path, "dtd", ["banded"])
    (tmp_path / "sun397_prompt.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable JSON"):
        load_descriptions(tmp_path, "sun397", ["abbey"])


def test_environment_variable_gives_the_folder(tmp_path, monkeypatch):
    _write(tmp_path)
    monkeypatch.setenv(D.ENV_VAR, str(tmp_path))
    assert load_descriptions(None, "eurosat", ["Forest"]) == [TEXTS["Forest"]]


def test_toyworld_has_built_in_descriptions(tmp_path, monkeypatch):
    monkeypatch.setenv(D.ENV_VAR, str(tmp_path))  # no file there: the built-in ones
    out = load_descriptions(None, "toyworld", ["red star", "blue ring"])
    assert [len(d) for d in out] == [10, 10]
    assert all("red" in t and "star" in t for t in out[0])
    assert out == load_descriptions(None, "toyworld", ["red star", "blue ring"])
    _write(tmp_path, "toyworld", {"red star": ["mine."]})  # a user file wins
    assert load_descriptions(None, "toyworld", ["red star"]) == [["mine."]]


# ----------------------------------------------------------------------------- features
def _reference(clip, descriptions):
    rows = [F.normalize(clip.encode_text(tokenize(d, clip.context_length)), dim=-1)
            for d in descriptions]
    return rows


def test_per_description_and_mean_features(tiny_clip):
    texts = [TEXTS["Annual Crop Land"], TEXTS["Forest"], TEXTS["Sea or Lake"]]
    per = description_features(tiny_clip, texts, "per_description")
    ref = _reference(tiny_clip, texts)
    assert per.shape == (2, 3, tiny_clip.embed_dim) and per.dtype == torch.float32
    torch.testing.assert_close(per, torch.stack(ref, dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per.norm(dim=-1), torch.ones(2, 3))
    uneven = [texts[0], texts[1][:1], texts[2] + ["a third one."]]
    mean = description_features(tiny_clip, uneven, "mean")
    want = F.normalize(torch.stack([r.mean(0) for r in _reference(tiny_clip, uneven)]), dim=-1)
    torch.testing.assert_close(mean, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"same number of descriptions.*class 1 has 1.*mean"):
        description_features(tiny_clip, uneven, "per_description")
    with pytest.raises(ValueError, match="mode must be"):
        description_features(tiny_clip, texts, "max")
    with pytest.raises(ValueError, match="at least one"):
        description_features(tiny_clip, [[]], "mean")


def test_features_are_cached_per_backbone_and_content(tiny_clip, tiny_config, monkeypatch):
    texts = [["a photo of a cat."], ["a photo of a dog."]]
    first = description_features(tiny_clip, texts)
    files = sorted((cache_dir() / "descriptions").glob("*.safetensors"))
    assert len(files) == 1 and not list((cache_dir() / "descriptions").glob(".*.tmp"))
    calls = []
    real = D._encode
    monkeypatch.setattr(D, "_encode", lambda clip, t: calls.append(len(t)) or real(clip, t))
    assert torch.equal(description_features(tiny_clip, texts), first)
    assert calls == []  # read from the cache
    description_features(tiny_clip, [["a photo of a cat."], ["a photo of a wolf."]])
    torch.manual_seed(1)
    other = build_clip(tiny_config).eval().requires_grad_(False)
    description_features(other, texts)
    assert calls == [2, 2]  # new content, new backbone: computed once each
    assert len(list((cache_dir() / "descriptions").glob("*.safetensors"))) == 3
    # a damaged entry is recomputed and replaced
    files[0].write_bytes(b"broken")
    assert torch.equal(description_features(tiny_clip, texts), first) and calls[-1] == 2


def test_parallel_jobs_compute_once(tmp_path, tiny_clip):
    backbone = save_clip(tiny_clip, tmp_path / "clip.safetensors")
    log = tmp_path / "computed.log"
    script = textwrap.dedent(f"""
        import time, torch
        from vlprompt.clip.load import load_clip
        from vlprompt.data import descriptions as D
        real = D._encode
        def slow(clip, texts):
            with open({str(log)!r}, "a") as f:
                f.write("x\\n")
            time.sleep(1.5)
            return real(clip, texts)
        D._encode = slow
        clip = load_clip({str(backbone)!r})
        out = D.description_features(clip, [["a red cat."], ["a blue dog."]], "mean")
        torch.save(out, __import__("sys").argv[1])
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLPROMPT_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"out{i}.pt")],
                              env=env) for i in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    assert log.read_text().count("x") == 1
    assert torch.equal(torch.load(tmp_path / "out0.pt"), torch.load(tmp_path / "out1.pt"))
