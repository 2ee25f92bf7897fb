"""Numerical parity of the CLIP core with Hugging Face ``transformers`` CLIPModel on random
weights, through every checkpoint format ``load_clip`` reads."""

import pytest
import torch

from vlprompt import load_clip, save_clip, tokenize
from vlprompt.clip.load import read_checkpoint

transformers = pytest.importorskip("transformers")

TEXTS = ["a photo of a cat.", "a centered satellite photo of Annual Crop Land.",
         "a photo of a 747-400, a type of aircraft.", "x"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _features(out):
    # transformers >= 5 returns a model output; older versions a tensor
    return out if torch.is_tensor(out) else out.pooler_output


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=128, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=0),
        vision_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8,
                           hidden_act="quick_gelu"),
        projection_dim=32)
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    folder = tmp_path_factory.mktemp("hf") / "clip"
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def reference_outputs(hf_model):
    model, _ = hf_model
    torch.manual_seed(1)
    images = torch.randn(3, 3, 32, 32)
    tokens = tokenize(TEXTS)
    with torch.no_grad():
        return (images, tokens, _features(model.get_image_features(pixel_values=images)),
                _features(model.get_text_features(input_ids=tokens)))


def _formats(hf_folder, tmp_path):
    """The same weights written in every supported format."""
    clip = load_clip(hf_folder)
    paths = {"hf_folder": hf_folder,
             "pt": save_clip(clip, tmp_path / "clip.pt"),
             "safetensors": save_clip(clip, tmp_path / "clip.safetensors")}
    nested = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}}
    torch.save(nested, tmp_path / "nested.pth")
    paths["nested_ddp"] = tmp_path / "nested.pth"
    images, tokens = torch.zeros(1, 3, 32, 32), tokenize(["a"])
    traced = torch.jit.trace(clip, (images, tokens), check_trace=False)
    traced.save(str(tmp_path / "ViT-tiny.pt"))
    paths["torchscript"] = tmp_path / "ViT-tiny.pt"
    return paths


@pytest.mark.parametrize("fmt", ["hf_folder", "pt", "safetensors", "nested_ddp", "torchscript"])
def test_features_match_transformers(hf_model, reference_outputs, tmp_path, fmt):
    images, tokens, ref_image, ref_text = reference_outputs
    path = _formats(hf_model[1], tmp_path)[fmt]
    clip = load_clip(path)
    with torch.no_grad():
        image, text = clip.encode_image(images), clip.encode_text(tokens)
    assert _rel(image, ref_image) <= 1e-4
    assert _rel(text, ref_text) <= 1e-4
    assert torch.allclose(clip.logit_scale, hf_model[0].logit_scale.detach())


def test_torchscript_archive_is_read_as_torchscript(hf_model, tmp_path):
    path = _formats(hf_model[1], tmp_path)["torchscript"]
    state, _ = read_checkpoint(path)
    assert "visual.conv1.weight" in state and "transformer.resblocks.1.attn.in_proj_weight" in state


def test_architecture_inferred_from_weights(hf_model):
    clip = load_clip(hf_model[1])
    cfg = clip.config
    assert (cfg.vision_width, cfg.vision_layers, cfg.patch_size, cfg.image_size) == (128, 2, 8, 32)
    assert (cfg.text_width, cfg.text_layers, cfg.context_length, cfg.embed_dim) == (128, 2, 77, 32)
    assert cfg.vocab_size == 49408 and cfg.vision_heads == 2 and cfg.text_heads == 2
