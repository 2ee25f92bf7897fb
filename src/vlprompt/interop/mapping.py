"""Applying an ``OfficialLayout``: official state dicts <-> a method's trainable tensors, and
the method config that official shapes and configs imply. See ``interop/layout.py`` for the
key templates."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections import OrderedDict, defaultdict
from typing import Any, Optional

import torch
from torch import Tensor

from .layout import OfficialLayout, Setting

TOKEN_KEYS = ("token_prefix", "token_suffix")


class _Template:
    """One key template: ``base`` with an optional ``{i}``, a trailing-dot prefix, or a
    ``[{i}]`` slot of a stacked tensor."""

    def __init__(self, text: str):
        self.slot = text.endswith("[{i}]")
        self.base = text[:-5] if self.slot else text
        self.prefix = self.base.endswith(".")
        self.indexed = "{i}" in self.base
        pattern = re.escape(self.base).replace(re.escape("{i}"), r"(?P<i>\d+)")
        self.regex = re.compile("^" + pattern + ("(?P<rest>.+)" if self.prefix else "") + "$")

    def match(self, key: str) -> Optional[tuple[Optional[int], str]]:
        m = self.regex.match(key)
        if not m:
            return None
        index = int(m.group("i")) if self.indexed else None
        return index, (m.group("rest") if self.prefix else "")

    def render(self, index: Optional[int], rest: str) -> str:
        return (self.base.replace("{i}", str(index)) if self.indexed else self.base) + rest


def _translate(items: dict[str, Tensor], src: _Template, dst: _Template, delta: int
               ) -> tuple[list[tuple[str, Optional[int], Tensor, str]], set[str]]:
    """Atoms (dst key, dst slot, tensor, src name) of the ``items`` that ``src`` matches, and
    the keys it matched; dst index = src index + ``delta`` (a negative one belongs to another
    rule: COMMA's generator 0 is its own official module)."""
    atoms, used = [], set()
    for key, tensor in items.items():
        m = src.match(key)
        if m is None or (m[0] is not None and m[0] + delta < 0):
            continue
        used.add(key)
        index, rest = m
        rows = (list(enumerate(tensor.unbind(0))) if src.slot else [(index, tensor)])
        for idx, value in rows:
            out = None if idx is None else idx + delta
            name = f"{key}[{idx}]" if src.slot else key
            atoms.append((dst.render(out, rest), out if dst.slot else None, value, name))
    return atoms, used


def _assemble(atoms: list[tuple[str, Optional[int], Tensor, str]]
              ) -> tuple[dict[str, Tensor], dict[str, list[str]]]:
    """Stack slotted atoms (rows 0..N-1, none missing); one tensor per unslotted key."""
    groups: dict[str, list] = defaultdict(list)
    for key, slot, value, name in atoms:
        groups[key].append((slot, value, name))
    tensors, sources = {}, {}
    for key, parts in groups.items():
        sources[key] = [n for _, _, n in parts]
        if parts[0][0] is None:
            first = parts[0][1]
            if any(p[1].shape != first.shape or not torch.equal(p[1], first) for p in parts[1:]):
                # one Parameter under two names is fine; two different tensors are not
                raise ValueError(f"{', '.join(sources[key])} all map to {key} but differ")
            tensors[key] = parts[0][1]
            continue
        parts.sort(key=lambda p: p[0])
        slots = [p[0] for p in parts]
        if slots != list(range(len(slots))):
            raise ValueError(f"{key}: layers {slots} found, expected 0..{len(slots) - 1} "
                             f"(from {', '.join(sources[key])})")
        tensors[key] = torch.stack([p[1] for p in parts])  # [N, ...] from N per-layer tensors
    return tensors, sources


@dataclasses.dataclass
class Mapped:
    """An official checkpoint sorted out: what goes into the method, what is recomputed, what
    is the frozen backbone and what could not be placed (names as ``model/key``)."""

    tensors: dict[str, Tensor]
    sources: dict[str, list[str]]
    tokens: dict[str, Tensor]
    backbone: list[tuple[str, str, Tensor]]  # (vlprompt CLIP key, official name, tensor)
    dropped: list[str]
    unplaced: list[str]
    optional: set[str]


def official_name(layout: OfficialLayout, model: str, key: str) -> str:
    return f"{model}/{key}" if len(layout.models) > 1 else key


def official_to_ours(layout: OfficialLayout, states: dict[str, dict[str, Tensor]]) -> Mapped:
    """Sort the official state dicts ``{registered model: state dict}`` by ``layout``."""
    atoms, optional = [], set()
    left = {model: dict(state) for model, state in states.items()}
    for rule in layout.rules:
        model = layout.model_of(rule.model)
        found, used = _translate(left.get(model, {}), _Template(rule.official),
                                 _Template(rule.ours), rule.offset)
        atoms += [(k, s, _squeezed(v) if rule.squeeze else v, official_name(layout, model, n))
                  for k, s, v, n in found]
        if rule.optional:
            optional |= {k for k, _, _, _ in found}
        for key in used:
            del left[model][key]
    tensors, sources = _assemble(atoms)
    tokens, backbone, dropped, unplaced = {}, [], [], []
    token_model = layout.tokens_model or layout.models[0]
    for model, state in left.items():
        for key, value in state.items():
            name = official_name(layout, model, key)
            if model == token_model and key in {layout.tokens + t for t in TOKEN_KEYS}:
                tokens[key[len(layout.tokens):]] = value
            elif any(re.match(re.escape(p), key) for p in layout.ignored):
                dropped.append(name)
            elif (ours := _backbone_key(layout, key)) is not None:
                backbone.append((ours, name, value))
            else:
                unplaced.append(name)
    return Mapped(tensors, sources, tokens, backbone, dropped, unplaced, optional)


def _backbone_key(layout: OfficialLayout, key: str) -> Optional[str]:
    for prefix, ours in layout.backbone.items():
        if key == prefix or (prefix.endswith(".") and key.startswith(prefix)):
            return ours + key[len(prefix):]
    return None


def ours_to_official(layout: OfficialLayout, tensors: dict[str, Tensor]
                     ) -> dict[str, "OrderedDict[str, Tensor]"]:
    """The method's tensors in the official layout ``{registered model: state dict}`` (the
    tensors the rules cover; tokens and the frozen backbone are the caller's)."""
    out: dict[str, OrderedDict] = {m: OrderedDict() for m in layout.models}
    for rule in layout.rules:
        found, _ = _translate(tensors, _Template(rule.ours), _Template(rule.official),
                              -rule.offset)
        state, _ = _assemble(found)
        if rule.squeeze:
            state = {k: v.unsqueeze(0) for k, v in state.items()}  # [D] -> [1, D]
        out[layout.model_of(rule.model)].update(state)
    return out


def _squeezed(value: Tensor) -> Tensor:
    """``[1, ...]`` -> ``[...]``; another shape is kept (and reported as a wrong shape)."""
    return value[0] if value.dim() and value.shape[0] == 1 else value


def optional_keys(layout: OfficialLayout, keys) -> set[str]:
    """The vlprompt keys that the layout's ``optional`` rules cover."""
    templates = [_Template(r.ours) for r in layout.rules if r.optional]
    return {k for k in keys if any(t.match(k) for t in templates)}


# ------------------------------------------------------------------------------ config
def shape_fields(layout: OfficialLayout, tensors: dict[str, Tensor]) -> dict[str, Any]:
    """Config fields the tensors' shapes fix (``layout.shapes``; see ``OfficialLayout``)."""
    out = {}
    for field, (keys, how) in layout.shapes.items():
        keys = (keys,) if isinstance(keys, str) else tuple(keys)
        if how in ("first", "last"):
            numbers = _star_numbers(keys[0], tensors)
            if numbers:
                out[field] = (min if how == "first" else max)(numbers)
            continue
        present = [tensors[n] for k in keys for n in
                   (sorted(fnmatch.filter(tensors, k)) if "*" in k else [k]) if n in tensors]
        if how.startswith("dim"):
            out[field] = int(present[0].shape[int(how[3:])]) if present else 0
        elif how == "layers":
            out[field] = sum(1 if t.dim() == 2 else int(t.shape[0]) for t in present)
        elif how == "count":
            out[field] = sum(1 for k in tensors if fnmatch.fnmatchcase(k, keys[0]))
        elif how == "ndim3":
            out[field] = bool(present and present[0].dim() == 3)
        else:
            raise ValueError(f"unknown shape rule {how!r} for {field}")
    return out


def _star_numbers(pattern: str, tensors: dict[str, Tensor]) -> list[int]:
    """The numbers at the ``*`` of ``pattern`` in the keys that match it (``text.*.up.weight``)."""
    regex = re.compile("^" + re.escape(pattern).replace(r"\*", r"(\d+)") + "$")
    return [int(m.group(1)) for k in tensors if (m := regex.match(k))]


def coerce(value: Any, like: Any) -> Any:
    """An official config value as the type of the vlprompt field's default."""
    if isinstance(like, bool):
        if isinstance(value, str):
            return value.strip().lower() in ("true", "1", "yes")
        return bool(value)
    if isinstance(like, int) and not isinstance(value, bool):
        return int(value)
    if isinstance(like, float):
        return float(value)
    if isinstance(like, str):
        return "" if value is None else str(value)
    return value


def _shifted(value: Any, offset: int) -> Any:
    """A number, or each number of a list (a list of 1-based block indices), plus ``offset``."""
    if isinstance(value, (list, tuple)):
        return [int(v) + offset for v in value]
    return value + offset


def field_of(spec: str | Setting) -> str:
    """The vlprompt field an entry of ``OfficialLayout.config`` sets."""
    return spec.field if isinstance(spec, Setting) else spec


def config_fields(layout: OfficialLayout, flat: dict, defaults: dict) -> dict[str, Any]:
    """Method config fields from an official flat config (``layout.config``)."""
    out = {}
    for key, spec in layout.config.items():
        field = field_of(spec)
        if key not in flat or field not in defaults:
            continue
        value = flat[key]
        if isinstance(spec, Setting) and spec.suffix:
            value = ("" if value is None else str(value)) + spec.suffix
        value = coerce(value, defaults[field])
        if isinstance(spec, Setting) and spec.offset:
            value = _shifted(value, spec.offset)
        out[field] = value
    return out


def dassl_config(layout: OfficialLayout, fields: dict) -> dict:
    """The official config keys of the method fields (for an official-style ``config.yaml``);
    a text field that does not end with its ``Setting.suffix`` has no official value."""
    out = {}
    for key, spec in layout.config.items():
        field = field_of(spec)
        if field not in fields:
            continue
        value = fields[field]
        if isinstance(spec, Setting) and spec.suffix:
            if not (isinstance(value, str) and value.endswith(spec.suffix)):
                continue
            value = value[:-len(spec.suffix)]
        if isinstance(spec, Setting) and spec.offset:
            value = _shifted(value, -spec.offset)
        out[key] = value
    return out
