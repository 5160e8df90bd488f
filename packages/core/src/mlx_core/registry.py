"""One small generic registry, and the named registries every mlx package fills.

Packages register into these through the ``mlx.plugins`` entry-point group (see ``plugins.py``);
no package imports a sibling just to register itself.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A name that is not registered; the message lists the close matches."""

    def __str__(self) -> str:  # KeyError would repr() the message and add quotes
        return str(self.args[0])


def close_matches(name: str, candidates: list[str], n: int = 3) -> list[str]:
    """Names from ``candidates`` that look like ``name`` (typos, missing suffixes)."""
    lowered = {c.lower(): c for c in candidates}
    found = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.5)
    # A prefix or substring is a strong hint too ("smollm2" -> "smollm2-135m-instruct").
    for c in candidates:
        if len(found) >= n:
            break
        if name.lower() in c.lower() and c.lower() not in found:
            found.append(c.lower())
    return [lowered[f] for f in found]


class _Deferred:
    """An entry registered as ``"module:attribute"``, imported when it is first asked for."""

    def __init__(self, target: str):
        module, _, attribute = target.partition(":")
        if not module or not attribute:
            raise ValueError(f"a deferred entry is 'module:attribute', got {target!r}")
        self.module, self.attribute = module, attribute

    def load(self):
        return getattr(importlib.import_module(self.module), self.attribute)


class Registry(Generic[T]):
    """Name -> object, with helpful errors. ``kind`` names what is stored, for messages."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T | _Deferred] = {}

    def register(self, name: str, item: T | None = None, *, overwrite: bool = False):
        """``registry.register("x", obj)``, or ``@registry.register("x")`` as a decorator."""
        if item is None:

            def decorator(obj: T) -> T:
                self.register(name, obj, overwrite=overwrite)
                return obj

            return decorator
        if name in self._items and not overwrite and self._items[name] is not item:
            raise ValueError(
                f"{self.kind} {name!r} is already registered; pass overwrite=True to replace it"
            )
        self._items[name] = item
        return item

    def register_deferred(self, name: str, target: str, *, overwrite: bool = False) -> None:
        """Register ``target`` (``"module:attribute"``) under ``name`` without importing it: it
        is imported when first asked for (``get``, ``items``). For plugins whose entries import
        torch: every ``mlx`` command loads every plugin, ``--help`` included."""
        self.register(name, _Deferred(target), overwrite=overwrite)

    def get(self, name: str) -> T:
        try:
            item = self._items[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None
        if isinstance(item, _Deferred):
            item = self._items[name] = item.load()
        return item

    def unknown_message(self, name: str) -> str:
        names = sorted(self._items)
        matches = close_matches(name, names)
        hint = f" Did you mean: {', '.join(matches)}?" if matches else ""
        known = ", ".join(names) if names else "(none registered)"
        return f"unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {known}."

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return [(name, self.get(name)) for name in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


# The registries named in ARCHITECTURE.md. Each is filled by the package that owns its things.
architectures: Registry[dict[str, Callable]] = Registry("architecture")  # name -> {backend: builder}
presets: Registry = Registry("preset")  # name -> ModelConfig
model_sources: Registry = Registry("model")  # name -> ModelSource
recipes: Registry = Registry("recipe")  # from mlx_train
adapter_methods: Registry = Registry("adapter method")  # from mlx_adapters
cli_commands: Registry = Registry("command group")  # name -> typer.Typer or a command function
benchmarks: Registry = Registry("benchmark")  # name -> command function, run as `mlx bench NAME`
# name -> load(source) -> (model, stream_generate), for `mlx generate/chat --backend NAME`; the
# torch zoo is mlx_core's own ("torch"), the others come from their packages (mlx-jax: "jax")
generation_backends: Registry = Registry("generation backend")


def register_architecture(name: str, backend: str, builder: Callable) -> None:
    """Add one backend's implementation (``torch``, ``flax``) of an architecture."""
    if name not in architectures:
        architectures.register(name, {})
    architectures.get(name)[backend] = builder
