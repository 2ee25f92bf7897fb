"""Bad checkpoints give clear errors; named backbones resolve to the cache; offline errors name
the file to fetch."""

import pytest
import torch

from vlprompt import load_clip, save_clip
from vlprompt.clip.load import canonical_backbone_name, resolve_backbone


def test_safetensors_keeps_architecture_metadata(tiny_config, tmp_path):
    from vlprompt.clip.model import build_clip

    tiny_config.vision_heads = 4  # not derivable from width // 64
    tiny_config.activation = "gelu"
    clip = build_clip(tiny_config)
    loaded = load_clip(save_clip(clip, tmp_path / "m.safetensors"))
    assert loaded.config == tiny_config
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(clip.encode_image(x), loaded.encode_image(x))


def test_missing_keys_are_reported(tiny_clip, tmp_path):
    state = tiny_clip.state_dict()
    del state["transformer.resblocks.1.mlp.c_fc.weight"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"Missing keys \(1\).*resblocks.1.mlp.c_fc.weight"):
        load_clip(tmp_path / "broken.pt")


def test_unexpected_keys_are_reported(tiny_clip, tmp_path):
    state = tiny_clip.state_dict()
    state["adapter.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="unexpected.*adapter.weight"):
        load_clip(tmp_path / "extra.pt")


def test_non_clip_and_corrupt_files(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "resnet.pt")
    with pytest.raises(ValueError, match="not a CLIP ViT checkpoint"):
        load_clip(tmp_path / "resnet.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="cannot read CLIP weights"):
        load_clip(tmp_path / "junk.pt")


def test_named_backbone_offline_error_names_file(tmp_path, monkeypatch):
    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        resolve_backbone("ViT-B/16", download=False)
    message = str(err.value)
    assert "ViT-B-16.pt" in message and str(tmp_path) in message and "https://" in message


def test_named_backbone_found_in_cache(tiny_clip, tmp_path, monkeypatch):
    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path))
    save_clip(tiny_clip, tmp_path / "ViT-B-32.pt")
    for name in ("ViT-B/32", "ViT-B-32", "openai/clip-vit-base-patch32"):
        assert resolve_backbone(name, download=False) == tmp_path / "ViT-B-32.pt"
    assert load_clip("ViT-B/32", download=False).backbone_name == "ViT-B/32"


def test_unknown_backbone_name():
    assert canonical_backbone_name("ViT-H/99") is None
    with pytest.raises(FileNotFoundError, match="neither an existing file"):
        resolve_backbone("ViT-H/99", download=False)
