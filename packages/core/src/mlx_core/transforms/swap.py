"""The transform seam: swap a model's linear layers for a transform's modules."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def swap_linears(model: nn.Module, build: Callable[[str, nn.Linear], nn.Module | None]) -> list[str]:
    """Replace each ``nn.Linear`` of ``model`` (the zoo's ``Linear`` included) by
    ``build(qualified_name, layer)``, or keep it where that returns None; returns the names
    replaced. A layer reachable under two names (shared) is built once and put in both places."""
    built: dict[int, nn.Module | None] = {}
    swapped = []
    for name, layer in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(layer, nn.Linear):
            continue
        if id(layer) not in built:
            built[id(layer)] = build(name, layer)
        if built[id(layer)] is None:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, built[id(layer)])
        swapped.append(name)
    return swapped
