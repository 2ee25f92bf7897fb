"""Method registry: the class attribute ``name`` is the single source of truth for a method's name."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from ..clip.model import CLIP
    from .base import Method

_REGISTRY: dict[str, type] = {}


def register_method(cls: type) -> type:
    """Class decorator: registers a Method subclass under ``cls.name``; duplicates are an error."""
    name = getattr(cls, "name", None)
    if not name:
        raise TypeError(f"{cls.__qualname__} has no 'name' class attribute")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"method name {name!r} is registered twice "
                         f"({_REGISTRY[name].__module__} and {cls.__module__})")
    _REGISTRY[name] = cls
    return cls


def _load_builtin_methods() -> None:
    # Importing the package imports every method module, which registers them.
    import importlib

    importlib.import_module("vlprompt.methods")


def list_methods() -> list[str]:
    _load_builtin_methods()
    return sorted(_REGISTRY)


def get_method(name: str) -> type:
    _load_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}") from None


def make_config(method_cls: type, overrides: Optional[dict] = None):
    """The method's Config with ``overrides`` applied; a key that names no field is an error
    that lists the fields."""
    overrides = dict(overrides or {})
    fields = {f.name: f for f in dataclasses.fields(method_cls.Config)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"{method_cls.name}: unknown config field(s) {', '.join(unknown)}; "
                         f"valid fields: {', '.join(fields)}")
    return method_cls.Config(**overrides)


def build_method(name: str, clip: "CLIP", classnames: Sequence[str], template: Optional[str] = None,
                 **config_overrides) -> "Method":
    """Build a registered method on a (frozen) CLIP for the given class names."""
    cls = get_method(name)
    return cls(clip, list(classnames), make_config(cls, config_overrides), template=template)
