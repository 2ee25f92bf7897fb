"""A tiny CLIP file and two synthetic datasets (EuroSAT and DTD layouts) for sweep tests."""

import os
from pathlib import Path

import pytest
import yaml

from vlprompt.clip.load import save_clip
from vlprompt.clip.model import CLIPConfig, build_clip
from vlprompt.data.synthetic import write_dataset

#: every run: 2 epochs (so a kill can land mid-run and resume), 1 thread, no loader workers
OVERRIDES = ["train.max_epoch=2", "train.num_workers=0", "train.batch_size=8",
             "train.eval_batch_size=16"]


@pytest.fixture(scope="session")
def sweep_world(tmp_path_factory) -> Path:
    import torch

    tmp = tmp_path_factory.mktemp("sweep_world")
    torch.manual_seed(0)
    clip = build_clip(CLIPConfig(embed_dim=32, image_size=32, patch_size=8, vision_width=64,
                                 vision_layers=2, vision_heads=2, text_width=64, text_layers=2,
                                 text_heads=2))
    save_clip(clip, tmp / "tiny.safetensors")
    for name in ("eurosat", "dtd"):
        write_dataset(tmp / "data", name, images_per_class=10, image_size=32)
    return tmp


def write_sweep(folder: Path, name: str = "sweep.yaml", **fields) -> Path:
    """A sweep file in ``folder`` over the sweep world (relative paths, as a user writes)."""
    spec = {"output": "out", "root": "data", "backbone": "tiny.safetensors",
            "methods": ["coop", "kgcoop"], "protocols": ["base2new"],
            "datasets": ["eurosat", "dtd"], "seeds": [1, 2], "overrides": OVERRIDES}
    spec.update(fields)
    path = folder / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def subprocess_env() -> dict:
    """The environment of a `vlprompt` child process: this checkout first, one thread."""
    import vlprompt

    src = str(Path(vlprompt.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
