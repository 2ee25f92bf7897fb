"""The config of an official run, from its output folder.

Dassl's ``train.py`` prints the resolved yacs config into ``<output>/log.txt`` under
``** Config **`` (``print(cfg)``: sorted ``KEY: value`` lines, two spaces per level); some users
also keep ``cfg.dump()`` as ``config.yaml``. Both are read into one flat dict of dotted keys
(``{"TRAINER.COOP.N_CTX": 16, ...}``); ``config.yaml`` wins where both exist.
"""

from __future__ import annotations

import ast
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional, Union

import yaml

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

_LINE = re.compile(r"^( *)([A-Za-z0-9_]+):(?: (.*))?$")


def _value(text: str) -> Any:
    """A yacs value as ``print(cfg)`` writes it: ``True``, ``16``, ``(224, 224)``, words."""
    text = text.strip()
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_yacs_text(lines: list[str]) -> dict:
    """Flat ``{dotted key: value}`` of the ``KEY: value`` block at the start of ``lines``."""
    out: dict = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the open sections
    for n, line in enumerate(lines):
        m = _LINE.match(line.rstrip("\n"))
        if not m:
            break
        indent, key, value = len(m.group(1)), m.group(2), m.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        nxt = _LINE.match(lines[n + 1].rstrip("\n")) if n + 1 < len(lines) else None
        opens = value is None and nxt is not None and len(nxt.group(1)) > indent
        if opens:
            stack.append((indent, key))
            continue
        out[".".join([k for _, k in stack] + [key])] = _value(value or "")
    return out


def _flatten(tree: Any, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def _log_file(folder: Path) -> Optional[Path]:
    """``log.txt``, else the newest ``log.txt-<time>`` (Dassl never overwrites a log)."""
    if (folder / "log.txt").is_file():
        return folder / "log.txt"
    logs = sorted(folder.glob("log.txt-*"))
    return logs[-1] if logs else None


def read_log_config(path: Path) -> dict:
    """The ``** Config **`` block of a Dassl ``log.txt`` (plus ``trainer``/``seed`` etc. of its
    ``** Arguments **`` block as ``args.<name>``)."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    out: dict = {}
    for i, line in enumerate(lines):
        if line.strip() == "** Arguments **":
            for arg in lines[i + 2:]:
                m = re.match(r"^([a-z_]+): (.*)$", arg)
                if not m:
                    break
                out[f"args.{m.group(1)}"] = _value(m.group(2))
        if line.strip() == "** Config **":
            out.update(parse_yacs_text(lines[i + 2:]))
            break
    return out


def read_official_config(folder: PathLike) -> tuple[dict, list[Path]]:
    """(flat config, the files it came from) of an official output folder; empty when the
    folder holds neither ``config.yaml`` nor a ``log.txt`` with a config block."""
    folder = Path(folder)
    config: dict = {}
    sources: list[Path] = []
    log = _log_file(folder)
    if log is not None:
        found = read_log_config(log)
        if found:
            config.update(found)
            sources.append(log)
    yml = folder / "config.yaml"
    if yml.is_file():
        try:
            tree = yaml.safe_load(yml.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            logger.warning("%s: not valid YAML (%s); ignored", yml, str(err).splitlines()[0])
            tree = None
        if isinstance(tree, dict):
            config.update(_flatten(tree))
            sources.append(yml)
    return config, sources


def nest(flat: dict) -> dict:
    """``{"A.B": 1}`` -> ``{"A": {"B": 1}}`` (for writing an official-style ``config.yaml``)."""
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree
