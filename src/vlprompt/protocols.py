"""The field's evaluation protocols as loops over the engine's ``run_experiment``/``evaluate_run``.

Four protocols (METHODS.md §1.2, PROTOCOL.md §3-4):

* ``base2new``: per dataset and seed, train on the base half of the classes (16 shots), test on the
  base test split and, with the same weights, on the new test split.
* ``fewshot``: per dataset, shots (1, 2, 4, 8, 16) and seed, train and test on all classes.
* ``xd`` (cross-dataset): train on ImageNet (all classes, 16 shots), test on the other 10 datasets.
* ``dg`` (domain generalisation): the same ImageNet model tested on ImageNet-V2/-Sketch/-A/-R.

Every run has its own folder ``<output>/<protocol>/<method>/<dataset>/shots_<K>/seed<S>/`` holding
the engine's ``results.json``; ``dg`` reuses the ``xd`` source-model folder (the papers evaluate the
same checkpoints, and the xd config is the one MaPLe/PromptSRC use for both), adding its
evaluations to the same ``results.json``. A run whose training finished and whose evaluations are
all present is skipped; a finished run missing evaluations only evaluates; an unfinished run
resumes from its last checkpoint (the engine does that). The backbone is loaded once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

if TYPE_CHECKING:
    from .engine.rundir import RunResults

logger = logging.getLogger(__name__)

#: the 11-dataset benchmark, in the order papers print it (config-file stems, PROTOCOL.md §8.2)
STANDARD_DATASETS: tuple[str, ...] = (
    "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
    "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101",
)
#: ImageNet variants of the domain-generalisation protocol (test only)
DG_TARGETS: tuple[str, ...] = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
PROTOCOLS: tuple[str, ...] = ("base2new", "fewshot", "xd", "dg")
FEWSHOT_SHOTS: tuple[int, ...] = (1, 2, 4, 8, 16)
DEFAULT_SHOTS = 16
#: the protocol whose folder and config the source model of ``dg`` lives in
_SOURCE_PROTOCOL = {"xd": "xd", "dg": "xd"}

PathLike = Union[str, os.PathLike]


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One training run of a protocol and the evaluations it must end up with.

    ``evaluations`` are ``(dataset, subsample)`` pairs; the first is the training dataset's own test
    split (done by ``run_experiment``), the others are added with ``evaluate_run``.
    """

    protocol: str           # the protocol whose config trains the model (``xd`` for ``dg``)
    method: str
    dataset: str            # training dataset
    shots: int
    seed: int
    subsample: str          # class subset trained on: "all" or "base"
    evaluations: tuple[tuple[str, str], ...]
    run_dir: Path
    #: dataset name -> what to load it from, for datasets given as a ``.yaml`` file
    specs: tuple[tuple[str, str], ...] = ()

    def spec(self, dataset: str) -> str:
        """What to pass to the data layer for ``dataset`` (its YAML file, else the name)."""
        return dict(self.specs).get(dataset, dataset)

    @property
    def evaluation_keys(self) -> list[str]:
        """Keys of ``results["evaluations"]`` this run needs."""
        from .engine.rundir import evaluation_key

        return [evaluation_key(dataset, subsample) for dataset, subsample in self.evaluations]

    def describe(self) -> str:
        return (f"{self.protocol} {self.method} {self.dataset} shots={self.shots} seed={self.seed}"
                f" ({self.subsample})")


def run_dir_for(output: PathLike, protocol: str, method: str, dataset: str, shots: int,
                seed: int) -> Path:
    """``<output>/<protocol>/<method>/<dataset>/shots_<K>/seed<S>``."""
    return Path(output) / protocol / method / dataset / f"shots_{shots}" / f"seed{seed}"


def _parse_list(value: Union[str, Sequence], what: str, cast=str) -> list:
    """``"a,b"`` or a sequence -> list, empty entries dropped, duplicates removed (order kept)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in items:
        item = item.strip() if isinstance(item, str) else item
        if item == "" or item is None:
            continue
        try:
            item = cast(item)
        except (TypeError, ValueError):
            raise ValueError(f"invalid {what} {item!r}: expected {cast.__name__} values "
                             f"separated by commas") from None
        if item not in out:
            out.append(item)
    if not out:
        raise ValueError(f"no {what} given")
    return out


def known_datasets() -> list[str]:
    """Dataset names the data layer can read (the valid values of ``--datasets``)."""
    from .data import list_datasets

    return list(list_datasets())


def known_methods() -> list[str]:
    from .methods import list_methods

    return list_methods()


def _check_names(names: Sequence[str], valid: Sequence[str], what: str) -> None:
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(map(repr, unknown))}; "
                         f"valid {what}s: {', '.join(valid)}")


def plan_protocol(protocol: str, method: str, datasets: Union[str, Sequence[str]] = "all",
                  seeds: Union[str, Sequence[int]] = (1, 2, 3), output: PathLike = "output",
                  shots: Union[None, int, str, Sequence[int]] = None,
                  source: str = "imagenet") -> list[PlannedRun]:
    """The runs a protocol consists of, in execution order (no files are touched).

    ``datasets``: for ``base2new``/``fewshot`` the training datasets; for ``xd`` the target
    datasets (``all`` = the 10 standard datasets other than ``source``); for ``dg`` the ImageNet
    variants (``all`` = the four). ``shots`` defaults to 16 (1/2/4/8/16 for ``fewshot``).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid protocols: {', '.join(PROTOCOLS)}")
    _check_names([method], known_methods(), "method")
    seed_list = _parse_list(seeds, "seed", int)
    if shots is None:
        shot_list = list(FEWSHOT_SHOTS) if protocol == "fewshot" else [DEFAULT_SHOTS]
    else:
        shot_list = _parse_list([shots] if isinstance(shots, int) else shots, "shots value", int)
    bad_shots = [k for k in shot_list if k < 1]
    if bad_shots:
        raise ValueError(f"shots must be >= 1, got {bad_shots}")

    if datasets == "all" or datasets == ["all"]:
        if protocol in ("base2new", "fewshot"):
            names = list(STANDARD_DATASETS)
        elif protocol == "xd":
            names = [d for d in STANDARD_DATASETS if d != source]
        else:
            names = list(DG_TARGETS)
    else:
        names = _parse_list(datasets, "dataset")
    from .data import dataset_name, is_dataset_file

    valid = known_datasets()
    specs = {dataset_name(n): n for n in names + [source] if is_dataset_file(n)}
    names = [dataset_name(n) if is_dataset_file(n) else n for n in names]
    if is_dataset_file(source):
        source = dataset_name(source)
    _check_names([n for n in names + ([source] if protocol in ("xd", "dg") else [])
                  if n not in specs], valid, "dataset")
    spec_pairs = tuple(specs.items())

    runs: list[PlannedRun] = []
    if protocol in ("base2new", "fewshot"):
        subsample = "base" if protocol == "base2new" else "all"
        evals = ("base", "new") if protocol == "base2new" else ("all",)
        for dataset in names:
            for k in shot_list:
                for seed in seed_list:
                    runs.append(PlannedRun(
                        protocol, method, dataset, k, seed, subsample,
                        tuple((dataset, e) for e in evals),
                        run_dir_for(output, protocol, method, dataset, k, seed), spec_pairs))
    else:
        if source in names:
            raise ValueError(f"{source!r} is the source dataset of {protocol!r}; "
                             f"list only target datasets")
        train_protocol = _SOURCE_PROTOCOL[protocol]
        for k in shot_list:
            for seed in seed_list:
                runs.append(PlannedRun(
                    train_protocol, method, source, k, seed, "all",
                    ((source, "all"),) + tuple((d, "all") for d in names),
                    run_dir_for(output, train_protocol, method, source, k, seed), spec_pairs))
    return runs


def run_state(run: PlannedRun,
              results: Optional["RunResults"]) -> tuple[str, list[tuple[str, str]]]:
    """``(state, missing evaluations)`` with state one of ``new``, ``resume`` (started, training
    unfinished), ``evaluate`` (trained, evaluations missing), ``done``."""
    from .engine.rundir import RunDir, RunResults, evaluation_key

    if isinstance(results, dict):
        results = RunResults.from_dict(results)
    if results is None:
        return ("resume" if RunDir(run.run_dir).started else "new"), list(run.evaluations)
    for key, expected in (("method", run.method), ("dataset", run.dataset), ("shots", run.shots),
                          ("seed", run.seed), ("subsample", run.subsample)):
        if getattr(results, key) != expected:
            raise ValueError(f"{run.run_dir / 'results.json'} is for "
                             f"{key}={getattr(results, key)!r}, not {expected!r}; use another "
                             f"--output or --force")
    if not results.finished:
        return "resume", list(run.evaluations)
    missing = [ev for ev in run.evaluations if evaluation_key(*ev) not in results.evaluations]
    return ("evaluate" if missing else "done"), missing


def _check_backbone(run: PlannedRun, results, clip, backbone) -> None:
    """The engine returns a finished run without loading its checkpoint, so a stale result of
    another backbone would otherwise be reported as this one's."""
    from .clip.fingerprint import backbone_fingerprint

    if results is None or not results.backbone_fingerprint:
        return
    fingerprint = backbone_fingerprint(clip)
    if results.backbone_fingerprint != fingerprint:
        raise ValueError(
            f"{run.run_dir} holds results of another backbone ({results.backbone!r}, fingerprint "
            f"{results.backbone_fingerprint[:23]}) than {str(backbone)!r} (fingerprint "
            f"{fingerprint[:23]}); use another --output or --force")


def run_protocol(protocol: str, method: str, datasets: Union[str, Sequence[str]],
                 seeds: Union[str, Sequence[int]], root: PathLike, backbone: Union[str, PathLike],
                 output: PathLike = "output", shots: Union[None, int, str, Sequence[int]] = None,
                 config_file: Optional[PathLike] = None, overrides: Sequence[str] = (),
                 force: bool = False, device=None, source: str = "imagenet",
                 clip=None, skip_missing: bool = False) -> list[Path]:
    """Run every training and evaluation of ``protocol`` for ``method``; returns the run folders.

    Finished runs are skipped (unless ``force``), unfinished ones resume; ``overrides`` are the
    engine's ``key=value`` strings and apply to every run after the method's
    ``configs/<method>/<protocol>.yaml``. ``clip`` (an already loaded backbone) skips loading.
    """
    runs = plan_protocol(protocol, method, datasets, seeds, output, shots, source=source)
    from .engine import distributed as D
    from .clip.load import load_clip

    D.init_distributed(None if device is None else str(device))
    device = D.default_device(None if device is None else str(device))
    # under torchrun every rank walks the same plan (the engine splits the work); one logs it
    log = logger.info if D.is_main() else logger.debug
    if clip is None:
        log("loading backbone %s on %s", backbone, device)
        clip = load_clip(backbone, device=device)
    total = len(runs)
    log("%s / %s: %d run(s) under %s", protocol, method, total, output)
    for n, run in enumerate(runs, 1):
        execute_run(run, root, backbone, clip, config_file=config_file, overrides=overrides,
                    force=force, device=device, skip_missing=skip_missing,
                    tag=f"[{n}/{total}] {run.describe()}")
    return [run.run_dir for run in runs]


def execute_run(run: PlannedRun, root: PathLike, backbone: Union[str, PathLike], clip,
                config_file: Optional[PathLike] = None, overrides: Sequence[str] = (),
                force: bool = False, device=None, skip_missing: bool = False,
                tag: Optional[str] = None) -> "RunResults":
    """Train (or resume, or skip) one planned run and add the evaluations it lacks, on an
    already loaded ``clip``; the one path of ``run_protocol`` and of every sweep launcher."""
    from . import engine
    from .engine import distributed as D
    from .engine.rundir import Evaluation, RunDir, RunResults, evaluation_key

    log = logger.info if D.is_main() else logger.debug
    tag = tag or run.describe()
    folder = RunDir(run.run_dir)
    results = None if force else folder.read_results()
    _check_backbone(run, results, clip, backbone)
    state = "new" if force else run_state(run, results)[0]
    present = ", ".join(run.evaluation_keys)
    log("%s: %s", tag, {"new": "training", "resume": "resuming", "evaluate": "evaluating",
                        "done": f"skipped (finished; {present} present)"}[state])
    # Always through run_experiment: it returns a finished run at once, but first checks that
    # the run folder's config is the one asked for (else a changed override would be ignored).
    results = RunResults.from_dict(engine.run_experiment(
        run.method, run.spec(run.dataset), root, backbone, run.run_dir, shots=run.shots,
        seed=run.seed, subsample=run.subsample, protocol=run.protocol,
        config_file=config_file, overrides=tuple(overrides), resume=True, force=force,
        device=device, clip=clip, skip_missing=skip_missing))
    for dataset, subsample in run_state(run, results)[1]:
        log("%s: evaluating on %s/%s", tag, dataset, subsample)
        entry = engine.evaluate_run(run.run_dir, run.spec(dataset), root, subsample=subsample,
                                    device=device, clip=clip, skip_missing=skip_missing)
        key = evaluation_key(dataset, subsample)
        results.evaluations[key] = Evaluation.from_dict(entry, key)
    if D.is_main():
        folder.clear_failure()  # an earlier attempt's record (sweeps) no longer applies
    if state != "done":
        log("%s: done (%s)", tag, ", ".join(
            f"{k} {results.accuracy(k):.2f}%" for k in run.evaluation_keys
            if results.accuracy(k) is not None))
    return results
