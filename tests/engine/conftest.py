import types

import pytest
import torch

from vlprompt.clip.load import load_clip, save_clip
from vlprompt.clip.model import CLIPConfig, build_clip

# Several processes share the test machine's cores: one intra-op thread avoids OpenMP spin-waits
# that make tiny models 100x slower.
torch.set_num_threads(1)

TINY = dict(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=2,
            vision_heads=2, text_width=64, text_layers=2, text_heads=2)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A tiny CLIP saved to a file and a synthetic EuroSAT (10 classes, 19 images each: 10 train,
    4 val, 5 test) in the real folder layout."""
    from vlprompt.data.synthetic import write_dataset

    root = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    clip_path = save_clip(build_clip(CLIPConfig(**TINY)), root / "tiny_clip.safetensors")
    data = root / "data"
    write_dataset(data, "eurosat", images_per_class=19, image_size=32, seed=0)
    return types.SimpleNamespace(root=root, clip_path=clip_path, data=data,
                                 clip=load_clip(clip_path))
