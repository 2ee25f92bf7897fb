"""Prompt-learning methods. Every module in this package is imported here, and each method class
registers itself with ``@register_method``, so adding a method means adding one file."""

import importlib
import pkgutil

from .base import Method, MethodConfig
from .registry import build_method, get_method, list_methods, make_config, register_method

_INFRASTRUCTURE = {"base", "registry", "prompts", "deep_prompts"}
for _info in pkgutil.iter_modules(__path__):
    if _info.name not in _INFRASTRUCTURE and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Method", "MethodConfig", "build_method", "get_method", "list_methods", "make_config",
           "register_method"]
