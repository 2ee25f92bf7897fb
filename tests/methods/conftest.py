import pytest
import torch

from vlprompt.clip.model import CLIPConfig, build_clip

# Several processes share the test machine's cores: one intra-op thread avoids OpenMP spin-waits
# that make tiny models 100x slower.
torch.set_num_threads(1)

TINY = dict(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=2,
            vision_heads=2, text_width=64, text_layers=2, text_heads=2)


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return build_clip(CLIPConfig(**TINY))
