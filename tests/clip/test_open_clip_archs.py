"""open_clip architectures: the table (``clip/open_clip_architectures.json``) gives what tensors
cannot (heads that are not width // 64, activation), checked against the tensors on load; parity
with Hugging Face ``transformers`` CLIPModel at a non-64 head width and a non-4 MLP ratio."""

from __future__ import annotations

import json

import pytest
import torch

from vlprompt import load_clip, tokenize
from vlprompt.clip.load import convert_hf_state_dict, infer_config, resolve_backbone
from vlprompt.clip.model import CLIP, CLIPConfig
from vlprompt.clip.open_clip_archs import (config_from_open_clip, open_clip_architecture,
                                           open_clip_names)

transformers = pytest.importorskip("transformers")

from .test_parity import _features, _rel  # noqa: E402  (after the transformers check)

TEXTS = ["a photo of a cat.", "a centered satellite photo of Annual Crop Land.", "x"]
#: open_clip's model-config format: vision heads = 80 // 16 = 5 (not 80 // 64 = 1), MLP 2.5 x
TINY_OPEN_CLIP = {"embed_dim": 32,
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 80, "head_width": 16,
                                 "mlp_ratio": 2.5, "patch_size": 8},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48,
                               "heads": 3, "layers": 2}}


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    """A random HF CLIPModel with 5 vision heads of 16 and 3 text heads of 16 (GELU), its
    weights as an open_clip checkpoint (OpenAI/open_clip keys) and the architecture JSON."""
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=48, intermediate_size=192,
                         num_hidden_layers=2, num_attention_heads=3, max_position_embeddings=77,
                         hidden_act="gelu", bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=0),
        vision_config=dict(hidden_size=80, intermediate_size=200, num_hidden_layers=2,
                           num_attention_heads=5, image_size=32, patch_size=8, hidden_act="gelu"),
        projection_dim=32)
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    tmp = tmp_path_factory.mktemp("open_clip")
    weights = tmp / "open_clip_pytorch_model.bin"
    torch.save(convert_hf_state_dict(model.state_dict()), weights)
    arch = tmp / "Tiny-ViT-hw16.json"
    arch.write_text(json.dumps(TINY_OPEN_CLIP))
    torch.manual_seed(1)
    images, tokens = torch.randn(3, 3, 32, 32), tokenize(TEXTS)
    with torch.no_grad():
        out = model(input_ids=tokens, pixel_values=images)
        ref = (_features(model.get_image_features(pixel_values=images)),
               _features(model.get_text_features(input_ids=tokens)), out.logits_per_image)
    return model, weights, arch, images, tokens, ref


def _outputs(clip, images, tokens):
    with torch.no_grad():
        return clip.encode_image(images), clip.encode_text(tokens), clip(images, tokens)[0]


@pytest.mark.parametrize("how", ["spec", "model_config", "table_entry", "clip_config"])
def test_non_64_head_width_matches_transformers(hf_tiny, how):
    model, weights, arch, images, tokens, (ref_image, ref_text, ref_logits) = hf_tiny
    if how == "spec":
        clip = load_clip(f"open_clip:{arch}:{weights}")
    elif how == "model_config":
        clip = load_clip(weights, config=TINY_OPEN_CLIP)
    elif how == "table_entry":
        from vlprompt.clip.open_clip_archs import entry_from_model_config

        clip = load_clip(weights, config=entry_from_model_config(TINY_OPEN_CLIP))
    else:
        clip = load_clip(weights, config=CLIPConfig(
            embed_dim=32, image_size=32, patch_size=8, vision_width=80, vision_layers=2,
            vision_heads=5, vision_mlp_width=200, text_width=48, text_layers=2, text_heads=3,
            activation="gelu"))
    assert (clip.config.vision_heads, clip.config.text_heads) == (5, 3)
    assert clip.config.vision_mlp_width == 200 and clip.config.text_mlp_width == 0
    image, text, logits = _outputs(clip, images, tokens)
    assert _rel(image, ref_image) <= 1e-4
    assert _rel(text, ref_text) <= 1e-4
    assert _rel(logits, ref_logits) <= 1e-4


def test_inference_alone_gets_the_heads_wrong(hf_tiny):
    """Why the table exists: the tensors say width 80, not how many heads share it."""
    _, weights, _, images, tokens, (ref_image, _, _) = hf_tiny
    clip = load_clip(weights, activation="gelu")
    assert clip.config.vision_heads == 1 and clip.config.vision_mlp_width == 200  # MLP: visible
    assert _rel(_outputs(clip, images, tokens)[0], ref_image) > 1e-3


def test_table_architecture_checked_against_tensors(hf_tiny):
    _, weights, *_ = hf_tiny
    with pytest.raises(ValueError) as err:
        load_clip(f"open_clip:ViT-B-32:{weights}")
    message = str(err.value)
    assert "\n" not in message and "given architecture (ViT-B-32)" in message


# --------------------------------------------------------------------------- the table
def test_table_lists_the_vit_families():
    names = set(open_clip_names())
    for name in ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-g-14",
                 "ViT-bigG-14", "ViT-B-32-quickgelu", "ViT-B-16-quickgelu", "ViT-L-14-quickgelu",
                 "ViT-L-14-336-quickgelu", "ViT-H-14-quickgelu", "ViT-bigG-14-quickgelu",
                 "RN50", "RN50-quickgelu"]:
        assert name in names, name


def test_table_configs_by_name():
    h = config_from_open_clip("ViT-H-14")
    assert (h.vision_width, h.vision_layers, h.vision_heads, h.patch_size) == (1280, 32, 16, 14)
    assert (h.text_width, h.text_layers, h.text_heads, h.embed_dim) == (1024, 24, 16, 1024)
    assert h.activation == "gelu" and h.vision_mlp_width == 0  # 4 x 1280
    g = config_from_open_clip("ViT-g-14")
    assert (g.vision_width, g.vision_heads, g.vision_mlp_width, g.vision_layers) == (
        1408, 16, 6144, 40)
    big = config_from_open_clip("ViT-bigG-14")
    assert (big.vision_width, big.vision_heads, big.vision_mlp_width) == (1664, 16, 8192)
    assert (big.text_width, big.text_heads, big.text_layers, big.embed_dim) == (1280, 20, 32, 1280)
    assert config_from_open_clip("vit-h/14") == h  # spellings
    assert config_from_open_clip("ViT-H-14-quickgelu").activation == "quick_gelu"
    assert config_from_open_clip("ViT-L-14-336").image_size == 336
    # the -quickgelu ViT-B/16 is OpenAI's ViT-B/16 exactly: the core's defaults
    assert config_from_open_clip("ViT-B-16-quickgelu") == CLIPConfig()
    rn = config_from_open_clip("RN50x4")
    assert (rn.vision_kind, rn.vision_stage_layers, rn.vision_width, rn.vision_heads,
            rn.image_size) == ("resnet", (4, 6, 10, 6), 80, 40, 288)


def test_table_entry_records_structure():
    entry = open_clip_architecture("ViT-H-14")
    assert entry["vision"]["head_width"] == 80 and entry["vision"]["pool"] == "tok"
    assert entry["vision"]["ln_pre"] is True
    assert entry["text"]["causal"] is True and entry["text"]["proj_bias"] is False
    assert entry["text"]["pool"] == "argmax"


@pytest.mark.parametrize("name", ["ViT-H-14", "ViT-g-14", "ViT-bigG-14"])
def test_full_size_shapes_agree_with_the_table(name):
    """A full-size model's tensor shapes (meta device: nothing allocated) infer back to the
    table's config except the head count, which only the table knows."""
    cfg = config_from_open_clip(name)
    with torch.device("meta"):
        state = CLIP(cfg).state_dict()
    inferred = infer_config(state, {"activation": cfg.activation})
    assert inferred.vision_heads == cfg.vision_width // 64 != cfg.vision_heads
    inferred.vision_heads = cfg.vision_heads
    inferred.text_heads = cfg.text_heads
    assert inferred == cfg


def test_unsupported_structure_is_refused():
    with pytest.raises(ValueError, match="does not implement") as err:
        config_from_open_clip("ViT-L-14-CLIPA")
    assert "vision.pool=\"avg\"" in str(err.value) and "text.causal=false" in str(err.value)
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        config_from_open_clip("ViT-Z-99")


def test_open_clip_name_alone_resolves_in_the_cache(tmp_path, monkeypatch, hf_tiny):
    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        resolve_backbone("open_clip:ViT-H-14")
    message = str(err.value)
    assert str(tmp_path / "open_clip" / "ViT-H-14") in message
    assert "open_clip_pytorch_model.bin" in message and "\n" not in message
    folder = tmp_path / "open_clip" / "ViT-H-14"
    folder.mkdir(parents=True)
    (folder / "open_clip_pytorch_model.bin").write_bytes(hf_tiny[1].read_bytes())
    assert resolve_backbone("open_clip:ViT-H-14") == folder / "open_clip_pytorch_model.bin"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_backbone(f"open_clip:ViT-H-14:{tmp_path / 'missing.bin'}")
