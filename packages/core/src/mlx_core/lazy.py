"""Package attributes imported at first access (PEP 562), so that importing a package is cheap."""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for the package named ``package``: each name of ``exports``
    (name -> the module that defines it) is imported when first accessed, then kept on the
    package. For packages whose plugin entry point every ``mlx`` command imports at its start,
    while their modules import torch (~2 s)."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(exports[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__
