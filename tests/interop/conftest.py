"""Fixtures: a tiny CLIP with 3 blocks per tower and different tower widths (so stacked deep
prompts have several rows and a width mix-up fails), saved to a file, a synthetic EuroSAT, and
LLM descriptions of its classes (HiCroPL's forward needs them) found through the environment."""

import types

import pytest
import torch

from vlprompt.clip.load import load_clip, save_clip
from vlprompt.clip.model import CLIPConfig, build_clip
from vlprompt.data import load_split
from vlprompt.data.descriptions import ENV_VAR, write_descriptions
from vlprompt.data.synthetic import write_dataset

torch.set_num_threads(1)

TINY3 = CLIPConfig(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=3,
                   vision_heads=2, text_width=48, text_layers=3, text_heads=2)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop_world")
    torch.manual_seed(0)
    clip_path = save_clip(build_clip(TINY3), root / "tiny3.safetensors")
    data = root / "data"
    write_dataset(data, "eurosat", images_per_class=4, image_size=32, seed=0)
    clip = load_clip(clip_path)
    split = load_split("eurosat", data)
    images = sorted(str(p) for p in data.rglob("*.jpg"))[:3]
    descriptions = root / "gpt_file"
    write_descriptions(descriptions, "eurosat", {c: [f"a satellite photo of {c}.",
                                                     f"{c} seen from above."]
                                                 for c in split.classnames})
    return types.SimpleNamespace(root=root, clip_path=str(clip_path), data=str(data), clip=clip,
                                 classnames=list(split.classnames), template=split.template,
                                 images=images, descriptions=str(descriptions))


@pytest.fixture(autouse=True)
def _descriptions(world, monkeypatch):
    monkeypatch.setenv(ENV_VAR, world.descriptions)


@pytest.fixture(scope="session")
def batch():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
