"""Throughput, memory and FLOPs of every method's real training step and evaluation (issue 14).

Each measurement runs the product's code on synthetic tensors: the engine's optimisation step
(``engine.train.make_train_step``: optimiser, autocast, gradient accumulation as ``train_method``
runs them) and its evaluation path (``engine.evaluate.predict_with_skipped`` over an in-memory
dataset), on a CLIP with random weights at a named backbone's shapes (speed does not depend on
the values). Reference-style mode measures the same step with every exact optimisation off
(``perf.reference_mode``: 77-token text passes, no text-feature caching, one text-tower call per
image for instance-conditional prompts) and, on a GPU, fp16 weights without autocast as the
official code runs, so each ratio is measured side by side in one process.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before the
measured steps; on CPU the peak resident set size (``/proc/self/statm``, sampled every 2 ms by a
thread) above the RSS before them — an estimate of the activation memory, since freed memory
the allocator keeps is not returned.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from ..clip.model import CLIP, CLIPConfig, build_clip

logger = logging.getLogger(__name__)

#: random-weight backbones by name (OpenAI's architectures); "tiny" is for tests
SHAPES: dict[str, CLIPConfig] = {
    "ViT-B/16": CLIPConfig(),
    "ViT-B/32": CLIPConfig(patch_size=32),
    "ViT-L/14": CLIPConfig(embed_dim=768, patch_size=14, vision_width=1024, vision_layers=24,
                           vision_heads=16, text_width=768, text_layers=12, text_heads=12),
    "tiny": CLIPConfig(embed_dim=32, image_size=32, patch_size=8, vision_width=64,
                       vision_layers=2, vision_heads=2, text_width=64, text_layers=2,
                       text_heads=2),
}

#: dense bf16 tensor-core peaks (TFLOP/s) by a substring of ``torch.cuda.get_device_name``,
#: from the vendors' data sheets (SXM parts; PCIe parts are listed separately where they differ)
BF16_PEAK_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
}

_CLASSNAMES = Path(__file__).resolve().parent.parent / "data" / "classnames" / "imagenet.txt"


def device_peak_tflops(name: str) -> float | None:
    """The bf16 peak of a GPU by its name (the first table entry it contains), or None."""
    for key, value in BF16_PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def bench_classnames(n: int) -> list[str]:
    """``n`` real class names (ImageNet's, so tokenised lengths are realistic), cycled with a
    numeric suffix past 1000."""
    names = [line.split(" ", 1)[1].strip() for line in _CLASSNAMES.read_text().splitlines()
             if line.strip()]
    return [names[i % len(names)] + ("" if i < len(names) else f" {i // len(names)}")
            for i in range(n)]


def random_clip(shape: str, device: torch.device, seed: int = 0) -> CLIP:
    """A frozen CLIP with random weights at ``shape`` (a ``SHAPES`` key)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown backbone shape {shape!r}; choose from {', '.join(SHAPES)}")
    torch.manual_seed(seed)
    clip = build_clip(copy.deepcopy(SHAPES[shape])).to(device)
    clip.requires_grad_(False)
    return clip.eval()


def paper_config(method: str, overrides: Sequence[str] = ()) -> dict:
    """The method's packaged base-to-new config (its paper's settings), resolved."""
    from ..config import resolve_config

    return resolve_config(method, "base2new", overrides=list(overrides))


def bench_descriptions(classnames: Sequence[str]) -> Path:
    """A description file in the official format for ``classnames`` (methods that read LLM
    descriptions: CoPrompt, HiCroPL), three sentences a class, in a temporary folder."""
    import hashlib
    import json
    import tempfile

    text = json.dumps({n: [f"a photo of a {n}.", f"a {n}, seen up close.",
                           f"the typical shape and colour of a {n}."] for n in classnames})
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"vlprompt-bench-descriptions-{digest}.json"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def build_bench_method(method: str, clip: CLIP, classnames: Sequence[str], config: dict,
                       shape: str | None = None):
    """The method with its paper's config on ``clip`` for ``classnames`` (description-reading
    methods get a generated description file; a distilling method gets a random-weight teacher,
    ``bench_teacher``)."""
    import dataclasses as dc

    from ..methods import get_method, make_config

    cls = get_method(method)
    fields = dict(config["method"])
    names = {f.name for f in dc.fields(cls.Config)}
    if "descriptions" in names and not fields.get("descriptions"):
        fields["descriptions"] = str(bench_descriptions(classnames))
        if "description_dataset" in names:
            fields["description_dataset"] = fields.get("description_dataset") or "bench"
    extra = {}
    teacher = bench_teacher(cls, fields, classnames, shape, clip)
    if teacher is not None:
        fields["teacher"], extra["teacher"] = "bench (random weights)", teacher
    return cls(clip, list(classnames), make_config(cls, fields), template="a photo of a {}.",
               **extra)


def bench_teacher(cls, fields: dict, classnames: Sequence[str], shape: str | None, clip: CLIP):
    """The teacher of a distilling method (``Method.teacher_recipe``, e.g. PromptKD's PromptSRC
    on ViT-L/14) built with its recipe's config on a random-weight CLIP of the recipe's backbone
    shape (the student's for shapes the recipe's is not known at, e.g. the tests' "tiny"); None
    for other methods. Its speed, not its values, is what a benchmark needs."""
    recipe = cls.teacher_recipe(fields)
    if recipe is None:
        return None
    from ..config import resolve_config

    teacher_shape = recipe.backbone if shape in SHAPES and shape != "tiny" and \
        recipe.backbone in SHAPES else None
    teacher_clip = (random_clip(teacher_shape, clip.logit_scale.device, seed=1)
                    if teacher_shape else clip)
    config = resolve_config(recipe.method, "base2new", config_file=recipe.config_file,
                            overrides=list(recipe.overrides))
    return build_bench_method(recipe.method, teacher_clip, classnames, config, teacher_shape)


class _RSSPeak:
    """Peak resident set size while active, sampled by a thread (CPU peak memory)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.peak = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self.page
        except OSError:
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> _RSSPeak:
        self.start = self.rss()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def delta_mb(self) -> float:
        return max(0, self.peak - self.start) / 2 ** 20


class _PeakMemory:
    """Peak memory above the start of the block, in MiB (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mb = 0.0

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.rss = _RSSPeak().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2 ** 20
        else:
            self.rss.__exit__(*exc)
            self.mb = self.rss.delta_mb


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(fn) -> int:
    """FLOPs of one call of ``fn`` (``torch.utils.flop_counter``: matmuls, convolutions and
    attention, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


@dataclasses.dataclass
class BenchSetting:
    """One measurement's settings (the command line's)."""

    shape: str = "ViT-B/16"
    device: str = "cpu"
    classes: int = 10
    #: training batch; None: the paper's (packaged base-to-new config)
    batch: int | None = None
    steps: int = 3
    warmup: int = 1
    eval_batch: int = 100
    eval_batches: int = 2
    #: measurement rounds, the two modes interleaved; the best round of each is kept
    rounds: int = 2
    #: the optimised path's ``train.precision`` (reference mode: fp32; fp16 weights on GPU)
    precision: str = "auto"
    flops: bool = True
    #: extra ``key=value`` config overrides for every method
    overrides: tuple = ()


def _synthetic(setting: BenchSetting, clip: CLIP, n: int, device: torch.device,
               seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = clip.image_size
    images = torch.randn(n, 3, size, size, generator=g)
    labels = torch.randint(0, setting.classes, (n,), generator=g)
    return images.to(device), labels.to(device)


class _Case:
    """One method in one mode, built once and measured repeatedly (so the two modes can be
    interleaved and the best of several rounds taken on a shared machine)."""

    def __init__(self, name: str, setting: BenchSetting, clip: CLIP, reference: bool):
        from ..config import TrainConfig
        from ..engine.train import make_train_step
        from ..methods import get_method
        from ..perf import reference_mode, switches

        self.setting, self.reference = setting, reference
        self.device = device = torch.device(setting.device)
        config = paper_config(name, setting.overrides)
        self.batch = batch = setting.batch or int(config["train"]["batch_size"])
        fields = dict(config["train"], batch_size=batch, grad_accum=1)
        precision = setting.precision
        if reference:
            precision = "fp32"  # the official code: fp16 weights on GPU (``clip``), fp32 on CPU
            fields.update(activation_checkpointing=False, compile=False)
        fields["precision"] = self.precision = precision
        self.train_config = TrainConfig(**fields)
        self.mode = reference_mode if reference else switches
        self.out: dict = {"method": name, "mode": "reference" if reference else "vlprompt",
                          "batch": batch,
                          "precision": "fp16 weights" if clip.dtype == torch.float16
                          else precision}
        with self.mode():
            torch.manual_seed(0)
            self.method = build_bench_method(name, clip, bench_classnames(setting.classes),
                                             config, setting.shape).to(device)
            self.trainable = (get_method(name).trainable
                              and self.method.num_trainable_parameters() > 0)
            self.images, self.labels = _synthetic(setting, clip, batch, device, 1)
            n_eval = setting.eval_batch * setting.eval_batches
            self.eval_images, self.eval_labels = _synthetic(setting, clip, n_eval, device, 2)
            self.step = (make_train_step(self.method, self.train_config, device)
                         if self.trainable else None)

    def _timed_steps(self, inputs: torch.Tensor, warmup: int) -> tuple[float, float]:
        """(seconds per training step on ``inputs``, peak MiB of the timed steps), after
        ``warmup`` untimed steps."""
        from ..engine.train import training_switches

        s, device = self.setting, self.device
        with self.mode(), training_switches(self.train_config):
            self.method.train()
            for _ in range(warmup):
                self.step(inputs, self.labels)
            _sync(device)
            with _PeakMemory(device) as mem:
                start = time.perf_counter()
                for _ in range(s.steps):
                    self.step(inputs, self.labels)
                _sync(device)
                elapsed = time.perf_counter() - start
        return elapsed / max(s.steps, 1), mem.mb

    def train_round(self, warmup: int) -> None:
        """Training steps: images/s, seconds per step and peak memory (best round kept)."""
        if self.step is None:
            return
        per_step, peak_mb = self._timed_steps(self.images, warmup)
        rate = self.batch / per_step
        if rate > self.out.get("train_images_per_s", 0.0):
            self.out.update(train_images_per_s=rate, step_s=per_step)
        self.out["train_peak_mb"] = max(self.out.get("train_peak_mb", 0.0), peak_mb)

    def cached_views_round(self) -> None:
        """``train.cached_views`` (methods with ``frozen_image_tower``): the same training step
        on image features computed beforehand, as the engine runs it (the image tower never
        runs); images/s of the step alone, the one-off feature pass excluded."""
        if self.step is None or self.reference or \
                getattr(self.method, "frozen_image_tower", False) is not True:
            return
        from ..engine.evaluate import autocast

        with torch.no_grad(), autocast(self.precision, self.device):
            features = self.method.frozen_image_features(self.images).float()  # [B, E]
        rate = self.batch / self._timed_steps(features, warmup=1)[0]
        if rate > self.out.get("cached_views_train_images_per_s", 0.0):
            self.out["cached_views_train_images_per_s"] = rate

    def eval_round(self) -> None:
        """The evaluation path over the evaluation images (class text features computed once
        per evaluation set where the method caches them, as in a real evaluation)."""
        from ..engine.evaluate import predict_with_skipped
        from ..perf import switches

        s, device = self.setting, self.device
        with self.mode():
            with switches(cache_text_features=False):  # warm-up that leaves nothing cached
                predict_with_skipped(self.method, TensorDataset(self.eval_images[:1],
                                                                self.eval_labels[:1]),
                                     batch_size=1, device=device, precision=self.precision)
            data = TensorDataset(self.eval_images, self.eval_labels)
            _sync(device)
            with _PeakMemory(device) as mem:
                start = time.perf_counter()
                predict_with_skipped(self.method, data, batch_size=s.eval_batch, device=device,
                                     precision=self.precision)
                _sync(device)
                elapsed = time.perf_counter() - start
        rate = self.eval_images.shape[0] / elapsed
        if rate > self.out.get("eval_images_per_s", 0.0):
            self.out["eval_images_per_s"] = rate
        self.out["eval_peak_mb"] = max(self.out.get("eval_peak_mb", 0.0), mem.mb)

    def count(self) -> None:
        """FLOPs per image of one training step and of one evaluation batch (its class text
        features included)."""
        from ..engine.evaluate import autocast
        from ..engine.train import training_switches
        from ..perf import switches

        with self.mode():
            if self.step is not None:
                def step():
                    with training_switches(self.train_config):
                        self.step(self.images, self.labels)
                self.out["train_flops_per_image"] = count_flops(step) / self.batch
            x = self.eval_images[: self.setting.eval_batch]

            def forward():
                # autograd on: FlopCounterMode's module tracker fails on views of parameters
                # taken under no_grad; the forward FLOPs are the same
                with switches(cache_text_features=False), autocast(self.precision, self.device):
                    self.method.eval()
                    self.method(x)
            self.out["eval_flops_per_image"] = count_flops(forward) / x.shape[0]


def measure_method(name: str, setting: BenchSetting, clip: CLIP,
                   ref_clip: CLIP | None = None, compare: bool = False) -> dict:
    """One method's figures: ``{"vlprompt": {...}}`` and, with ``compare``, ``"reference"``
    measured in interleaved rounds (best round of ``setting.rounds`` kept for each)."""
    cases = {"vlprompt": _Case(name, setting, clip, reference=False)}
    if compare:
        cases["reference"] = _Case(name, setting, ref_clip if ref_clip is not None else clip,
                                   reference=True)
    for r in range(setting.rounds):
        for case in cases.values():
            case.train_round(setting.warmup if r == 0 else 0)
    for r in range(setting.rounds):
        for case in cases.values():
            case.cached_views_round()
    for r in range(setting.rounds):
        for case in cases.values():
            case.eval_round()
    if setting.flops:
        cases["vlprompt"].count()
    return {k: c.out for k, c in cases.items()}


def run_bench(methods: Sequence[str], setting: BenchSetting,
              compare_reference: bool = True, on_row=None) -> dict:
    """Every method at ``setting``, optimised and (``compare_reference``) reference-style.

    Returns ``{"setting", "device_name", "peak_tflops", "results": [row, ...]}``; a row per
    method with ``vlprompt`` and ``reference`` figures, their ratios and, on a GPU, achieved
    TFLOP/s and MFU. A method that fails records its ``error`` and the others continue.
    ``on_row(report)`` is called with the report so far after each method (long runs keep
    what they measured when killed)."""
    device = torch.device(setting.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available")
    clip = random_clip(setting.shape, device)
    ref_clip = None
    if compare_reference and device.type == "cuda":
        ref_clip = copy.deepcopy(clip).half()  # the official code's fp16 weights
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    peak = device_peak_tflops(name) if device.type == "cuda" else None
    rows = []
    for method in methods:
        row: dict = {"method": method}
        try:
            row.update(measure_method(method, setting, clip, ref_clip=ref_clip,
                                      compare=compare_reference))
        except Exception as err:  # noqa: BLE001 - report it, measure the others
            logger.warning("bench: %s failed: %s: %s", method, type(err).__name__, err)
            row["error"] = f"{type(err).__name__}: {err}"
        _derive(row, peak)
        rows.append(row)
        logger.info("bench: %s done", method)
        if on_row is not None:
            on_row(_report(setting, name, peak, rows))
    return _report(setting, name, peak, rows)


def _report(setting: BenchSetting, device_name: str, peak: float | None, rows: list) -> dict:
    return {"setting": dataclasses.asdict(setting), "device_name": device_name,
            "peak_tflops": peak, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": list(rows)}


def _derive(row: dict, peak: float | None) -> None:
    """Ratios (vlprompt / reference) and, with a known peak, TFLOP/s and MFU."""
    opt, ref = row.get("vlprompt"), row.get("reference")
    if opt and ref:
        for key in ("train_images_per_s", "eval_images_per_s"):
            if opt.get(key) and ref.get(key):
                row[key.replace("_images_per_s", "_speedup")] = opt[key] / ref[key]
        if opt.get("cached_views_train_images_per_s") and ref.get("train_images_per_s"):
            row["cached_views_speedup"] = (opt["cached_views_train_images_per_s"]
                                           / ref["train_images_per_s"])
    if opt and peak:
        for kind in ("train", "eval"):
            flops, rate = opt.get(f"{kind}_flops_per_image"), opt.get(f"{kind}_images_per_s")
            if flops and rate:
                opt[f"{kind}_tflops"] = flops * rate / 1e12
                opt[f"{kind}_mfu"] = opt[f"{kind}_tflops"] / peak


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"
