"""The run folder's one owner: paths, the writer's lock, the config identity, the state, the
typed results and the atomic commit of a checkpoint generation.

Layout of a run folder::

    config.yaml                 the run's identity and resolved config (once training starts)
    log.txt                     training log + the run's own test evaluation (one ``=> result``)
    results.json                metrics and provenance, one entry per ``<dataset>/<subsample>``
    checkpoints/000007/         the newest committed generation: checkpoint.safetensors (learned
                                tensors), checkpoint.json (header), training_state.pt (resume)
    checkpoints/000006/         the previous generation (kept as a fallback)
    checkpoints/best-000004/    ``train.select: best_val`` only: the best epoch's tensors and
                                header (epoch, val accuracy), named by the generations' headers
    .lock                       held (``flock``) by the one process writing the folder
    progress.json               where training is (epoch, step, ETA), for sweep status tables
    failure.json                why the last attempt failed (sweeps), removed when a run succeeds

Guarantees:

* **Kills.** A generation is written into ``checkpoints/.tmp-*``, every file and the folder are
  fsynced, and one ``rename`` publishes it: at any instant the newest numbered folder is complete.
  The previous generation is deleted only after the new one is durable. Stale temporaries are
  removed when the next writer starts. Other files are replaced atomically (``fileio``).
  A best-epoch folder is published the same way before the generation that names it, and
  removed only once no kept generation names it, so a resumed run finds the best-so-far of the
  generation it resumes from.
* **One writer.** A writer holds an exclusive advisory lock on ``.lock`` for its lifetime (the OS
  releases it when the process dies); a second writer fails at once naming the holder. Readers
  (``report``, evaluation into another folder) never take it.
* **Identity.** ``config.yaml`` is written only once a run has really started (backbone and data
  loaded), so a failed start leaves the folder reusable.

Older run folders (``checkpoint.safetensors`` + ``checkpoint.json`` at the top) are still read.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import yaml

from ..fileio import (atomic_write_json, atomic_write_text, fsync_dir, fsync_file,
                      make_temp_file, remove_stale_temporaries, sha256_file)

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.json"
LOG_FILE = "log.txt"
LOCK_FILE = ".lock"
CHECKPOINTS_DIR = "checkpoints"
TENSORS_FILE = "checkpoint.safetensors"
HEADER_FILE = "checkpoint.json"
STATE_FILE = "training_state.pt"
PROGRESS_FILE = "progress.json"
FAILURE_FILE = "failure.json"
#: generations kept on disk: the newest and one fallback
KEEP_GENERATIONS = 2
_GENERATION = re.compile(r"^\d{6}$")
_TMP_PREFIX = ".tmp-"
BEST_PREFIX = "best-"
_BEST = re.compile(r"^best-\d{6}$")


def best_folder_name(epoch: int) -> str:
    """The folder under ``checkpoints/`` of the best-epoch checkpoint of ``epoch`` (best_val)."""
    return f"{BEST_PREFIX}{int(epoch):06d}"


def evaluation_key(dataset: str, subsample: str) -> str:
    """The key of an evaluation in ``results.json``: ``"<dataset>/<subsample>"``."""
    return f"{dataset}/{subsample}"


class RunLockedError(RuntimeError):
    """Another process is writing the run folder."""


# --------------------------------------------------------------------------- file operations
#: called after every file operation of a checkpoint commit with its description; tests replace
#: it to simulate a kill at each point of the commit
after_file_op: Callable[[str], None] = lambda what: None


# --------------------------------------------------------------------------- typed results
@dataclasses.dataclass
class Evaluation:
    """One evaluation entry of ``results.json`` (metrics in percent)."""

    dataset: str
    subsample: str
    accuracy: float
    macro_f1: float = 0.0
    num_images: int = 0
    num_correct: int = 0
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> str:
        return evaluation_key(self.dataset, self.subsample)

    @classmethod
    def from_dict(cls, data: dict, key: Optional[str] = None) -> "Evaluation":
        """From an entry of ``results.json``; ``key`` supplies dataset/subsample when absent."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        if key is not None and ("dataset" not in data or "subsample" not in data):
            dataset, _, subsample = key.rpartition("/")
            data = {"dataset": dataset, "subsample": subsample, **data}
        return cls(**{k: data[k] for k in known if k in data},
                   extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict:
        out = {"dataset": self.dataset, "subsample": self.subsample}
        out.update({k: v for k, v in self.extra.items()})
        out.update({"accuracy": self.accuracy, "macro_f1": self.macro_f1,
                    "num_images": self.num_images, "num_correct": self.num_correct})
        return out


@dataclasses.dataclass
class RunResults:
    """The content of ``results.json``: what was run, on what, and its evaluations."""

    method: str
    dataset: str
    shots: int
    seed: int
    subsample: str
    protocol: Optional[str] = None
    backbone: str = ""
    backbone_fingerprint: Optional[str] = None
    config: dict = dataclasses.field(default_factory=dict)
    num_trainable_params: int = 0
    train: dict = dataclasses.field(default_factory=dict)
    evaluations: dict[str, Evaluation] = dataclasses.field(default_factory=dict)
    vlprompt_version: str = ""
    versions: dict = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return bool(self.train.get("finished", False))

    def accuracy(self, key: str) -> Optional[float]:
        entry = self.evaluations.get(key)
        return None if entry is None or entry.accuracy is None else float(entry.accuracy)

    @classmethod
    def from_dict(cls, data: dict) -> "RunResults":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: data[k] for k in known if k in data}
        values["evaluations"] = {k: Evaluation.from_dict(v, k)
                                 for k, v in (data.get("evaluations") or {}).items()}
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("extra", "evaluations")}
        out["evaluations"] = {k: v.to_dict() for k, v in self.evaluations.items()}
        out.update(self.extra)
        return json.loads(json.dumps(out))


# --------------------------------------------------------------------------- generations
@dataclasses.dataclass(frozen=True)
class Generation:
    """One committed checkpoint: a folder holding the tensors, the header and (while training)
    the training state. ``index`` 0 is an old-format run folder's top-level files."""

    folder: Path
    index: int

    @property
    def tensors(self) -> Path:
        return self.folder / TENSORS_FILE

    @property
    def header_path(self) -> Path:
        return self.folder / HEADER_FILE

    @property
    def state_path(self) -> Path:
        return self.folder / STATE_FILE

    def header(self) -> dict:
        try:
            return json.loads(self.header_path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{self.header_path}: unreadable checkpoint header ({err})") from None

    def verify(self) -> Optional[str]:
        """None when the tensors and header are intact, else why not (one line)."""
        try:
            header = self.header()
        except ValueError as err:
            return str(err)
        if not self.tensors.is_file():
            return f"{self.tensors} is missing"
        expected = (header.get("files") or {}).get(TENSORS_FILE)
        if expected and sha256_file(self.tensors) != expected.get("sha256"):
            return f"{self.tensors} does not match its header (corrupt)"
        return None

    def state_problem(self) -> Optional[str]:
        """None when the training state is present and intact, else why not."""
        if not self.state_path.is_file():
            return f"{self.state_path} is missing"
        expected = (self.header().get("files") or {}).get(STATE_FILE)
        if expected and sha256_file(self.state_path) != expected.get("sha256"):
            return f"{self.state_path} does not match its header (corrupt)"
        return None


class RunDir:
    """A run folder (see the module docstring). Cheap to construct; touches no file until asked."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self._lock_fd: Optional[int] = None

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------------ paths
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS_FILE

    @property
    def log_path(self) -> Path:
        return self.path / LOG_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def evaluation_log_path(self, dataset: str, subsample: str) -> Path:
        """Where an evaluation other than the run's own test split logs its ``=> result`` block,
        so Dassl's ``parse_test_res.py`` (which reads the last block of ``<folder>/seed*/log.txt``)
        finds only that one: beside the run's parent folder, ``<parent>_test_<dataset>_<subsample>
        /<run name>/log.txt``, i.e. ``.../eurosat/shots_16_test_eurosat_new/seed1/log.txt``
        (folders outside the ``shots_<K>/seed<S>`` layout: ``<run>/test_<dataset>_<subsample>``)."""
        path = self.path.resolve()
        parent = path.parent
        if not (re.match(r"^seed\d+$", path.name) and parent.name.startswith("shots_")):
            return path / f"test_{dataset}_{subsample}" / LOG_FILE  # not the protocol layout
        return parent.with_name(f"{parent.name}_test_{dataset}_{subsample}") / path.name / LOG_FILE

    # ------------------------------------------------------------------ lock
    def lock(self) -> "RunDir":
        """Take the folder's writer lock (non-blocking); raise ``RunLockedError`` naming the
        holder if another process has it. Also removes stale temporaries of earlier writers."""
        if self._lock_fd is not None:
            return self
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no flock (Windows): unlocked, as before
            logger.debug("no fcntl: %s is not locked", self.path)
        except OSError:
            holder = self._read_holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"{self.path} is being written by another run ({holder}); wait for it to finish, "
                f"or give this run another --output/--run-dir") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._lock_fd = fd
        self.remove_stale_temporaries()
        return self

    @staticmethod
    def _read_holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            return f"pid {info['pid']} on {info['host']}, started {info['started']}"
        except (OSError, ValueError, KeyError):
            return "holder unknown"

    def unlock(self) -> None:
        if self._lock_fd is None:
            return
        try:
            os.ftruncate(self._lock_fd, 0)
        except OSError:
            pass
        os.close(self._lock_fd)  # closing the descriptor releases the flock
        self._lock_fd = None

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    def holder(self) -> Optional[dict]:
        """The process writing the folder now (``{"pid", "host", "started"}``), else None.
        Probes the lock without keeping it; a folder this object has locked counts as held."""
        path = self.path / LOCK_FILE
        if self._lock_fd is not None:
            return {"pid": os.getpid(), "host": socket.gethostname(), "started": ""}
        if not path.is_file():
            return None
        try:
            import fcntl
        except ImportError:
            return None
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            try:
                return json.loads(os.pread(fd, 4096, 0).decode() or "{}") or {"pid": None}
            except ValueError:
                return {"pid": None}
        finally:
            os.close(fd)  # releases the probe's shared lock, if it got one
        return None

    def __enter__(self) -> "RunDir":
        return self.lock()

    def __exit__(self, *exc) -> None:
        self.unlock()

    def remove_stale_temporaries(self) -> list[Path]:
        """What a killed writer left: unfinished generations, ``atomic_write`` temporaries and
        generations beyond the two kept."""
        removed = []
        if self.checkpoints.is_dir():
            for item in self.checkpoints.iterdir():
                if item.name.startswith(_TMP_PREFIX):
                    shutil.rmtree(item, ignore_errors=True)
                    removed.append(item)
        removed += remove_stale_temporaries(self.path)
        for old in [g for g in self.generations() if g.index > 0][KEEP_GENERATIONS:]:
            shutil.rmtree(old.folder, ignore_errors=True)  # a kill before the old one went
            removed.append(old.folder)
        removed += self._prune_best()
        if removed:
            logger.info("removed %d stale temporary file(s) in %s", len(removed), self.path)
        return removed

    # ------------------------------------------------------------------ identity and state
    def read_config(self) -> Optional[dict]:
        if not self.config_path.is_file():
            return None
        try:
            return yaml.safe_load(self.config_path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{self.config_path}: not valid YAML ({err}); delete it or use "
                             f"--force") from None

    def write_config(self, config: dict) -> None:
        atomic_write_text(self.config_path, yaml.safe_dump(config, sort_keys=False))

    @property
    def started(self) -> bool:
        """True once training has committed a checkpoint or results exist."""
        return self.latest_generation() is not None or self.results_path.is_file()

    def state(self) -> str:
        """``new`` (nothing trained yet), ``partial`` (a checkpoint, training unfinished or not
        evaluated) or ``finished`` (training finished and results written)."""
        results = self.read_results()
        if results is not None and results.finished:
            return "finished"
        return "partial" if self.started else "new"

    def clear(self) -> None:
        """Delete the run's outputs (``--force``); the log is kept and appended to."""
        for name in (CONFIG_FILE, RESULTS_FILE, TENSORS_FILE, HEADER_FILE, STATE_FILE,
                     PROGRESS_FILE, FAILURE_FILE):
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.checkpoints, ignore_errors=True)

    # ------------------------------------------------------------------ progress and failures
    def _read_json(self, name: str) -> Optional[dict]:
        """An advisory file (progress, failure): None when absent or unreadable."""
        try:
            data = json.loads((self.path / name).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def write_progress(self, progress: dict) -> None:
        """Where training is, with the time written (advisory: a status table reads it)."""
        stamped = {**progress, "updated": datetime.datetime.now().timestamp()}
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            tmp = make_temp_file(self.path / PROGRESS_FILE)  # a kill leaves a known stale name
            tmp.write_text(json.dumps(stamped) + "\n")  # no fsync: losing it loses nothing
            os.replace(tmp, self.path / PROGRESS_FILE)
        except OSError as err:  # advisory: a full disk must not stop training here
            logger.debug("could not write %s: %s", self.path / PROGRESS_FILE, err)

    def read_progress(self) -> Optional[dict]:
        return self._read_json(PROGRESS_FILE)

    def write_failure(self, failure: dict) -> None:
        atomic_write_json(self.path / FAILURE_FILE, failure)

    def read_failure(self) -> Optional[dict]:
        return self._read_json(FAILURE_FILE)

    def clear_failure(self) -> None:
        (self.path / FAILURE_FILE).unlink(missing_ok=True)

    # ------------------------------------------------------------------ results
    def read_results(self) -> Optional[RunResults]:
        if not self.results_path.is_file():
            return None
        try:
            return RunResults.from_dict(json.loads(self.results_path.read_text()))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{self.results_path}: not a valid results file ({err}); delete it "
                             f"or rerun with --force") from None

    def write_results(self, results: RunResults) -> None:
        atomic_write_json(self.results_path, results.to_dict())

    def merge_results(self, results: RunResults) -> RunResults:
        """Write ``results``, keeping evaluations already on disk that it does not replace."""
        previous = self.read_results()
        if previous is not None:
            for key, entry in previous.evaluations.items():
                results.evaluations.setdefault(key, entry)
        self.write_results(results)
        return results

    def add_evaluation(self, entry: Evaluation, base: Callable[[], RunResults]) -> RunResults:
        """Merge one evaluation into ``results.json`` (``base()`` builds the record when the
        file does not exist yet)."""
        results = self.read_results() or base()
        results.evaluations[entry.key] = entry
        self.write_results(results)
        return results

    # ------------------------------------------------------------------ checkpoints
    def generations(self) -> list[Generation]:
        """Committed generations, newest first (an old-format checkpoint counts as index 0)."""
        gens = []
        if self.checkpoints.is_dir():
            gens = [Generation(p, int(p.name)) for p in self.checkpoints.iterdir()
                    if _GENERATION.match(p.name) and p.is_dir()]
        gens.sort(key=lambda g: g.index, reverse=True)
        if (self.path / HEADER_FILE).is_file():
            gens.append(Generation(self.path, 0))
        return gens

    def latest_generation(self, verify: bool = False) -> Optional[Generation]:
        """The newest generation (with ``verify``: the newest intact one, warning about any
        newer corrupt one)."""
        for gen in self.generations():
            problem = gen.verify() if verify else None
            if problem is None:
                return gen
            logger.warning("%s; falling back to the previous checkpoint", problem)
        return None

    def commit(self, tensors: dict, header: dict,
               training_state: Optional[dict] = None) -> Generation:
        """Write a complete new generation and publish it with one atomic rename; then drop
        generations older than the previous one (and best-epoch folders no kept one names)."""
        previous = [g for g in self.generations() if g.index > 0]
        index = (previous[0].index if previous else 0) + 1
        header = {**header, "generation": index}
        final = self._publish(f"{index:06d}", tensors, header, training_state)
        for old in previous[KEEP_GENERATIONS - 1:]:
            shutil.rmtree(old.folder, ignore_errors=True)
            after_file_op(f"remove generation {old.index}")
        for name in (TENSORS_FILE, HEADER_FILE, STATE_FILE):  # an old-format checkpoint
            (self.path / name).unlink(missing_ok=True)
        self._prune_best()
        return Generation(final, index)

    def _publish(self, name: str, tensors: dict, header: dict,
                 training_state: Optional[dict] = None, op: str = "") -> Path:
        """Write ``checkpoints/<name>`` in a temporary folder, fsync it and rename it into place
        (``op`` prefixes the ``after_file_op`` descriptions)."""
        import torch
        from safetensors.torch import save_file

        self.checkpoints.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoints / f"{_TMP_PREFIX}{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        after_file_op(op + "mkdir")
        files = {}
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"epoch": str(header.get("epoch", 0))})
        after_file_op(op + "write tensors")
        files[TENSORS_FILE] = {"sha256": sha256_file(tmp / TENSORS_FILE)}
        if training_state is not None:
            torch.save(training_state, str(tmp / STATE_FILE))
            after_file_op(op + "write training state")
            files[STATE_FILE] = {"sha256": sha256_file(tmp / STATE_FILE)}
        header = {**header, "files": files}
        (tmp / HEADER_FILE).write_text(json.dumps(header, indent=2) + "\n")
        after_file_op(op + "write header")
        for file in (TENSORS_FILE, STATE_FILE, HEADER_FILE):
            if (tmp / file).exists():
                fsync_file(tmp / file)
        fsync_dir(tmp)
        after_file_op(op + "fsync")
        final = self.checkpoints / name
        os.rename(tmp, final)
        after_file_op(op + "rename")
        fsync_dir(self.checkpoints)
        after_file_op(op + "fsync folder")
        return final

    # ------------------------------------------------------------------ best epoch (best_val)
    def commit_best(self, tensors: dict, header: dict) -> Generation:
        """Publish the tensors and header of the best epoch so far as ``checkpoints/best-<epoch>``
        (atomic, like a generation). The generation committed next names it in its header's
        ``best`` record; until then it is unreferenced. A folder of the same epoch can only be a
        killed attempt's or belong to a generation being redone, so it is replaced."""
        epoch = int(header["epoch"])
        name = best_folder_name(epoch)
        if (self.checkpoints / name).exists():  # a killed attempt's, or the superseded
            shutil.rmtree(self.checkpoints / name)  # newest generation's (a fallback resume)
            after_file_op(f"best remove old {name}")
        final = self._publish(name, tensors, header, op="best ")
        return Generation(final, epoch)

    def best_generation(self, record: Optional[dict]) -> Optional[Generation]:
        """The best-epoch folder a generation header's ``best`` record names (None if none)."""
        if not record or not record.get("folder"):
            return None
        return Generation(self.checkpoints / record["folder"], int(record.get("epoch", 0)))

    def _best_referenced(self) -> Optional[set]:
        """Best-epoch folders named by the kept generations (None if a header is unreadable)."""
        names = set()
        for gen in self.generations():
            try:
                names.add((gen.header().get("best") or {}).get("folder"))
            except ValueError:
                return None
        return names

    def _prune_best(self) -> list[Path]:
        """Remove the best-epoch folders no kept generation names (none if unsure)."""
        if not self.checkpoints.is_dir():
            return []
        referenced = self._best_referenced()
        if referenced is None:
            return []
        removed = []
        for item in sorted(self.checkpoints.iterdir()):
            if _BEST.match(item.name) and item.name not in referenced:
                shutil.rmtree(item, ignore_errors=True)
                after_file_op(f"remove {item.name}")
                removed.append(item)
        return removed


def iter_run_dirs(root: PathLike) -> Iterator[RunDir]:
    """Every run folder (a folder holding ``results.json``) under ``root``, in path order."""
    root = Path(root)
    if root.is_file():
        yield RunDir(root.parent)
        return
    for path in sorted(root.rglob(RESULTS_FILE)):
        yield RunDir(path.parent)
