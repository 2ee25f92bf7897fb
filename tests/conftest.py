"""Shared fixtures: tiny randomly initialised CLIPs (the real 49408-token vocabulary)."""

import pytest
import torch

from vlprompt.clip.model import CLIPConfig, build_clip

# width 128 / 2 heads follows OpenAI's heads = width // 64 rule, so the model also round-trips
# through formats that carry no architecture metadata (.pt state dicts, TorchScript).
TINY = dict(embed_dim=32, image_size=32, patch_size=8, vision_width=128, vision_layers=2,
            vision_heads=2, text_width=128, text_layers=2, text_heads=2)


@pytest.fixture
def tiny_config() -> CLIPConfig:
    return CLIPConfig(**TINY)


@pytest.fixture
def tiny_clip(tiny_config):
    torch.manual_seed(0)
    return build_clip(tiny_config).eval().requires_grad_(False)


def pytest_configure(config):
    # One intra-op thread: tiny models are dominated by threading overhead, and CI has 2 cores.
    torch.set_num_threads(1)
    # Keep the user's cache folder (downloads, fingerprints) out of the tests.
    import os
    import tempfile

    os.environ.setdefault("VLPROMPT_CACHE", tempfile.mkdtemp(prefix="vlprompt-test-cache-"))
    # ``train.precision: auto`` means bf16 on CPUs with native bf16: the tests compare numbers with
    # fp32 references, so on every machine (and in the CLI subprocesses) auto is fp32 on CPU;
    # tests/engine/test_precision.py checks the choice itself
    os.environ["VLPROMPT_CPU_BF16"] = "0"


@pytest.fixture(scope="module")
def eurosat_world(tmp_path_factory):
    """(folder, backbone file): a tiny random CLIP saved to a file and synthetic EuroSAT-layout
    data (10 classes, 10 images each) under ``folder / "data"``."""
    from vlprompt.clip.load import save_clip
    from vlprompt.data.synthetic import write_dataset

    tmp = tmp_path_factory.mktemp("eurosat_world")
    clip = build_clip(CLIPConfig(embed_dim=32, image_size=32, patch_size=8, vision_width=64,
                                 vision_layers=2, vision_heads=2, text_width=64, text_layers=2,
                                 text_heads=2))
    backbone = save_clip(clip, tmp / "tiny.safetensors")
    write_dataset(tmp / "data", "eurosat", images_per_class=10, image_size=32)
    return tmp, backbone
