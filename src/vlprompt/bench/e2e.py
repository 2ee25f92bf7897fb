"""``vlprompt bench --e2e METHOD``: an ImageNet-sized base-to-new job end to end (issue 14).

Writes a synthetic ImageNet in the CoOp layout (``data.synthetic.write_dataset``: 224x224 JPEGs,
``classes`` classes, half of them base) and runs it through ``protocols.run_protocol`` — the code
path of ``vlprompt run base2new`` — on a random-weight CLIP of the chosen shape, then prints the
wall time and where it went. The breakdown comes from timers this module installs around the
engine's stages for the duration of the job only (``StageTimers``; nothing is timed otherwise):

* data loading: waiting for the training DataLoader's next batch;
* image tower / text tower: their forward passes during training (``VisionTransformer.forward``,
  ``CLIP.encode_text_embeddings``);
* backward: ``Tensor.backward`` (both towers' backward passes);
* optimiser: the engine's ``_apply_step`` (optimiser step and zeroing);
* evaluation: ``engine.evaluate.evaluate_method`` (base and new test sets, data loading included);
* other: the rest (dataset writing excluded: reported separately).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

STAGES = ("data loading", "image tower", "text tower", "backward", "optimiser", "evaluation")


@dataclasses.dataclass
class E2ESetting:
    method: str = "maple"
    classes: int = 1000
    shots: int = 16
    epochs: int = 5
    batch: int = 4
    device: str = "cpu"
    shape: str = "ViT-B/16"
    seed: int = 1
    overrides: tuple = ()


class StageTimers:
    """Wall time per stage, from wrappers installed on entry and removed on exit."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = {s: 0.0 for s in STAGES}
        self._depth = 0  # inside evaluation: its time is the evaluation's only
        self._patches: list = []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _wrap(self, owner, attr: str, stage: str, outer: bool = False) -> None:
        original = getattr(owner, attr)
        timers = self

        def timed(*args, **kwargs):
            if timers._depth and not outer:
                return original(*args, **kwargs)
            timers._sync()
            start = time.perf_counter()
            if outer:
                timers._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                if outer:
                    timers._depth -= 1
                timers._sync()
                timers.seconds[stage] += time.perf_counter() - start
        setattr(owner, attr, timed)
        self._patches.append((owner, attr, original))

    def __enter__(self) -> StageTimers:
        from torch.utils.data import dataloader

        from .. import protocols
        from ..clip import model
        from ..engine import run as engine_run
        from ..engine import train as engine_train

        self._wrap(dataloader._BaseDataLoaderIter, "__next__", "data loading")
        self._wrap(model.VisionTransformer, "forward", "image tower")
        self._wrap(model.CLIP, "encode_text_embeddings", "text tower")
        self._wrap(torch.Tensor, "backward", "backward")
        self._wrap(engine_train, "_apply_step", "optimiser")
        for module in (engine_run, engine_train, protocols):
            if hasattr(module, "evaluate_method"):
                self._wrap(module, "evaluate_method", "evaluation", outer=True)
        return self

    def __exit__(self, *exc) -> None:
        for owner, attr, original in reversed(self._patches):
            setattr(owner, attr, original)
        self._patches.clear()


def run_e2e(setting: E2ESetting, root: str | None = None) -> dict:
    """Write the synthetic dataset, run base-to-new, return the timings."""
    from ..data.synthetic import write_dataset
    from ..protocols import run_protocol
    from .measure import random_clip

    device = torch.device(setting.device)
    folder = Path(root) if root else Path(tempfile.mkdtemp(prefix="vlprompt-e2e-"))
    clip = random_clip(setting.shape, device)
    per_class = max(2 * setting.shots + 2, 6)  # 50/20/30 split: at least ``shots`` train images
    start = time.perf_counter()
    write_dataset(folder / "data", "imagenet", num_classes=setting.classes,
                  images_per_class=per_class, image_size=224, seed=0)
    write_s = time.perf_counter() - start
    overrides = [f"train.max_epoch={setting.epochs}", f"train.batch_size={setting.batch}",
                 "train.max_steps=null", *setting.overrides]
    with StageTimers(device) as timers:
        start = time.perf_counter()
        run_dirs = run_protocol("base2new", setting.method, ["imagenet"], [setting.seed],
                                folder / "data", f"random {setting.shape}",
                                output=folder / "output", shots=setting.shots,
                                overrides=overrides, force=True, device=str(device), clip=clip)
        wall = time.perf_counter() - start
    stages = dict(timers.seconds)
    stages["other"] = max(0.0, wall - sum(stages.values()))
    return {"setting": dataclasses.asdict(setting), "dataset_write_s": write_s, "wall_s": wall,
            "stages_s": stages, "run_dirs": [str(d) for d in run_dirs],
            "images_per_class": per_class, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def print_e2e(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["setting"]
    table = Table(title=f"vlprompt bench --e2e {s['method']}: base2new, {s['classes']} classes "
                        f"({s['classes'] // 2} base) x {s['shots']} shots, {s['epochs']} epochs, "
                        f"batch {s['batch']}, {s['shape']} random weights, {s['device']}")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("share", justify="right")
    wall = report["wall_s"] or 1.0
    for stage, seconds in report["stages_s"].items():
        table.add_row(stage, f"{seconds:.1f}", f"{100 * seconds / wall:.1f}%")
    table.add_row("wall time", f"{report['wall_s']:.1f}", "100%")
    with contextlib.suppress(Exception):
        Console(width=120).print(table)
    print(f"(synthetic dataset written in {report['dataset_write_s']:.1f} s, not counted)")
