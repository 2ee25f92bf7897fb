"""Benchmark readers, one module each. Every module in this package is imported here and its
classes register themselves with ``@register_dataset``, so a new dataset is one new file."""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
