"""What a sweep is: methods × protocols × datasets × seeds × shots × config grid points, planned
into one job per run folder.

A sweep file (YAML; relative paths are relative to the file)::

    output: runs/paper           # where the run folders go (``--output`` overrides it)
    root: /data                  # data root
    backbone: ViT-B/16
    methods: [coop, kgcoop]
    protocols: [base2new]        # base2new, fewshot, xd, dg
    datasets: [eurosat, dtd]     # or "all", or per protocol: {xd: all, dg: [imagenetv2]}
    seeds: [1, 2, 3]
    shots: [16]                  # optional (fewshot: 1,2,4,8,16)
    overrides: [train.max_epoch=2]  # applied to every run
    grid:                        # one sweep per combination, each under <output>/<key=value,...>
      train.lr: [0.002, 0.0035]

Runs of ``xd`` and ``dg`` for the same method and seed share a folder (``dg`` evaluates the
``xd`` source model); they become one job whose evaluations are the union, so no two jobs ever
write one folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import shlex
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

from ..protocols import PROTOCOLS, PlannedRun, plan_protocol

PathLike = Union[str, os.PathLike]

SWEEP_KEYS = ("output", "root", "backbone", "methods", "protocols", "datasets", "seeds", "shots",
              "source", "config", "overrides", "grid", "skip_missing")


@dataclasses.dataclass(frozen=True)
class SweepJob:
    """One run folder to bring to "done": train (or resume) and add its evaluations."""

    run: PlannedRun
    #: the protocols of the sweep that asked for this folder (``["xd", "dg"]`` for a shared one)
    protocols: tuple[str, ...]
    #: sweep-wide overrides followed by the grid point's
    overrides: tuple[str, ...] = ()
    #: the grid point as ``key=value`` strings (empty without a grid)
    grid_point: tuple[str, ...] = ()

    @property
    def run_dir(self) -> Path:
        return self.run.run_dir

    def describe(self) -> str:
        grid = f" [{', '.join(self.grid_point)}]" if self.grid_point else ""
        return f"{'+'.join(self.protocols)} {self.run.method} {self.run.dataset} " \
               f"shots={self.run.shots} seed={self.run.seed}{grid}"

    def to_dict(self) -> dict:
        run = dataclasses.asdict(self.run)
        run["run_dir"] = str(self.run.run_dir)
        return {"run": run, "protocols": list(self.protocols), "overrides": list(self.overrides),
                "grid_point": list(self.grid_point)}

    @classmethod
    def from_dict(cls, data: dict) -> "SweepJob":
        run = dict(data["run"])
        run["run_dir"] = Path(run["run_dir"])
        run["evaluations"] = tuple(tuple(e) for e in run["evaluations"])
        run["specs"] = tuple(tuple(s) for s in run.get("specs", ()))
        return cls(PlannedRun(**run), tuple(data["protocols"]), tuple(data["overrides"]),
                   tuple(data["grid_point"]))


@dataclasses.dataclass
class Sweep:
    """Settings shared by every job plus the planned jobs (picklable: jobs carry it)."""

    name: str
    output: Path
    root: str
    backbone: str
    jobs: list[SweepJob]
    config_file: Optional[str] = None
    source: str = "imagenet"
    skip_missing: bool = False
    force: bool = False
    device: Optional[str] = None

    @property
    def state_dir(self) -> Path:
        """``<output>/.vlprompt-sweep``: manifests and submitit's job folders."""
        return self.output / ".vlprompt-sweep"

    @property
    def manifest_path(self) -> Path:
        return self.state_dir / f"{self.name}.json"

    def rerun_command(self, job: SweepJob) -> str:
        """The ``vlprompt run`` line that brings exactly this folder to "done"."""
        run = job.run
        targets = [d for d, _ in run.evaluations if d != run.dataset]
        protocol = "dg" if "dg" in job.protocols and "xd" not in job.protocols else job.protocols[0]
        words = ["vlprompt", "run", protocol, "--method", run.method]
        if protocol in ("xd", "dg"):
            words += ["--source", run.spec(run.dataset)]
            words += ["--datasets", ",".join(run.spec(d) for d in targets)] if targets else []
        else:
            words += ["--datasets", run.spec(run.dataset)]
        words += ["--seeds", str(run.seed), "--shots", str(run.shots), "--root", self.root,
                  "--backbone", self.backbone, "--output", str(_grid_root(job, self.output))]
        if self.config_file:
            words += ["--config", self.config_file]
        if self.skip_missing:
            words.append("--skip-missing")
        return shlex.join(words + list(job.overrides))

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "jobs"}
        out["output"] = str(self.output)
        out["jobs"] = [job.to_dict() for job in self.jobs]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Sweep":
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields}
        kwargs["output"] = Path(kwargs["output"])
        kwargs["jobs"] = [SweepJob.from_dict(j) for j in data["jobs"]]
        return cls(**kwargs)


def _grid_root(job: SweepJob, output: Path) -> Path:
    """The output folder the job's protocol layout starts in (``<output>/<grid tag>``)."""
    return output / grid_tag(job.grid_point) if job.grid_point else output


def grid_tag(point: Sequence[str]) -> str:
    """Folder name of a grid point: ``train.lr=0.002,method.n_ctx=4``."""
    return ",".join(point).replace("/", "_")


def _as_list(value: Any, what: str) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ValueError(f"{what}: expected a list or a comma-separated string, got {value!r}")


def _override_value(value: Any) -> str:
    """A grid value as the engine's ``key=value`` parser (YAML) reads it back."""
    return value if isinstance(value, str) else json.dumps(value)


def grid_points(grid: Optional[dict]) -> list[tuple[str, ...]]:
    """Every combination of the grid's values, as ``key=value`` tuples (one empty point without
    a grid)."""
    if not grid:
        return [()]
    if not isinstance(grid, dict):
        raise ValueError(f"grid: expected a mapping of key: [values], got {grid!r}")
    keys, values = [], []
    for key, options in grid.items():
        options = options if isinstance(options, list) else [options]
        if not options:
            raise ValueError(f"grid: {key} has no values")
        if "." not in str(key):
            raise ValueError(f"grid: {key!r} must name a section, e.g. train.{key} or method.{key}")
        keys.append(str(key))
        values.append([_override_value(v) for v in options])
    return [tuple(f"{k}={v}" for k, v in zip(keys, combo)) for combo in itertools.product(*values)]


def plan_sweep(methods: Sequence[str], protocols: Sequence[str], output: PathLike,
               datasets: Union[str, Sequence[str], dict] = "all",
               seeds: Union[str, Sequence] = (1, 2, 3),
               shots: Union[None, str, Sequence] = None, source: str = "imagenet",
               overrides: Sequence[str] = (), grid: Optional[dict] = None) -> list[SweepJob]:
    """The jobs of a sweep in execution order; folders shared by protocols (xd/dg) are merged.
    ``datasets`` may map a protocol to its datasets (``{xd: all, dg: [imagenetv2]}``)."""
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad or not protocols:
        raise ValueError(f"unknown protocol(s) {', '.join(map(repr, bad)) or '(none given)'}; "
                         f"valid protocols: {', '.join(PROTOCOLS)}")
    if not methods:
        raise ValueError("no methods given")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
    jobs: dict[Path, SweepJob] = {}
    output = Path(output)
    for point in grid_points(grid):
        base = output / grid_tag(point) if point else output
        for method in methods:
            for protocol in protocols:
                names = datasets.get(protocol, "all") if isinstance(datasets, dict) \
                    else datasets
                for run in plan_protocol(protocol, method, names, seeds, base, shots,
                                         source=source):
                    _add_job(jobs, SweepJob(run, (protocol,), tuple(overrides) + point, point))
    return list(jobs.values())


def _add_job(jobs: dict, job: SweepJob) -> None:
    previous = jobs.get(job.run_dir)
    if previous is None:
        jobs[job.run_dir] = job
        return
    evaluations = previous.run.evaluations + tuple(
        e for e in job.run.evaluations if e not in previous.run.evaluations)
    specs = tuple(dict(previous.run.specs + job.run.specs).items())
    run = dataclasses.replace(previous.run, evaluations=evaluations, specs=specs)
    jobs[job.run_dir] = dataclasses.replace(
        previous, run=run, protocols=previous.protocols + tuple(
            p for p in job.protocols if p not in previous.protocols))


def sweep_name(jobs: Sequence[SweepJob]) -> str:
    """A stable name for a plan (same runs -> same manifest), so relaunching the same command
    updates its manifest instead of adding one."""
    digest = hashlib.sha256("\n".join(sorted(str(j.run_dir) for j in jobs)).encode())
    return f"sweep-{digest.hexdigest()[:12]}"


def _resolve(base: Path, value: Optional[str]) -> Optional[str]:
    """A path from the sweep file, relative to the file."""
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    return str(path if path.is_absolute() else base / path)


def _resolve_backbone(base: Path, value: str) -> str:
    """A backbone name (``ViT-B/16``) stays a name; an open_clip spec keeps its architecture
    and resolves its file; anything else is a path."""
    from ..clip.load import canonical_backbone_name, map_open_clip_paths

    spec = map_open_clip_paths(value, lambda file: _resolve(base, file))
    if spec is not None:
        return spec
    return value if canonical_backbone_name(value) is not None else _resolve(base, value)


def _dataset_list(base: Path, value: Any) -> Union[str, list]:
    """``all`` or names; dataset ``.yaml`` files are paths relative to the sweep file."""
    if value == "all":
        return "all"
    return [_resolve(base, d) if str(d).endswith((".yaml", ".yml")) else str(d)
            for d in _as_list(value, "datasets")]


def load_sweep_file(path: PathLike, output: Optional[PathLike] = None,
                    overrides: Sequence[str] = ()) -> Sweep:
    """Read and plan a sweep file (see the module docstring); ``output``/``overrides`` from the
    command line take precedence / are appended."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with keys {', '.join(SWEEP_KEYS)}")
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: "
                         f"{', '.join(SWEEP_KEYS)}")
    for key in ("root", "methods", "protocols"):
        if not data.get(key):
            raise ValueError(f"{path}: '{key}' is required")
    base = path.resolve().parent
    out = Path(output) if output is not None else Path(_resolve(base, data.get("output"))
                                                       or "output")
    datasets = data.get("datasets", "all")
    if isinstance(datasets, dict):
        unknown = sorted(set(datasets) - set(PROTOCOLS))
        if unknown:
            raise ValueError(f"{path}: datasets: {', '.join(unknown)} is not a protocol; map "
                             f"protocols ({', '.join(PROTOCOLS)}) to dataset lists")
        datasets = {p: _dataset_list(base, d) for p, d in datasets.items()}
    else:
        datasets = _dataset_list(base, datasets)
    try:
        jobs = plan_sweep(
            [str(m) for m in _as_list(data["methods"], "methods")],
            [str(p) for p in _as_list(data["protocols"], "protocols")], out, datasets,
            _as_list(data.get("seeds", [1, 2, 3]), "seeds"),
            _as_list(data["shots"], "shots") if data.get("shots") is not None else None,
            str(data.get("source", "imagenet")),
            [str(o) for o in _as_list(data.get("overrides"), "overrides")] + list(overrides),
            data.get("grid"))
    except (ValueError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise ValueError(f"{path}: {message}") from None
    return Sweep(sweep_name(jobs), out, _resolve(base, str(data["root"])),
                 _resolve_backbone(base, str(data.get("backbone", "ViT-B/16"))), jobs,
                 config_file=_resolve(base, data.get("config")),
                 source=str(data.get("source", "imagenet")),
                 skip_missing=bool(data.get("skip_missing", False)))
