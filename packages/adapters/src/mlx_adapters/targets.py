"""Which modules an adapter wraps: PEFT's ``target_modules`` rules."""

from __future__ import annotations

import re

from torch import nn

from mlx_adapters.config import PeftConfig
from mlx_adapters.layer import QUANTIZED_BASES, AdapterLayer

_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")
_OUTPUT_HEADS = {"lm_head", "score", "classifier"}


def _matches(name: str, patterns) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_targets(model: nn.Module, config: PeftConfig) -> list[str]:
    """Names of the ``nn.Linear`` modules to wrap; an error names the candidates if none match."""
    linear = _linear_modules(model)
    wanted = config.target_modules
    if wanted is None:
        raise ValueError("target_modules is required (names, a regex or 'all-linear'); linear "
                         f"modules in this model: {_short_names(linear)}")
    if wanted == "all-linear":
        chosen = [n for n in linear if n.split(".")[-1] not in _OUTPUT_HEADS]
    else:
        chosen = [n for n in linear if _matches(n, wanted)]
    chosen = [n for n in chosen if not _matches(n, config.exclude_modules)]
    layers = config.layers_to_transform
    if layers is not None:
        layers = {layers} if isinstance(layers, int) else set(layers)
        chosen = [n for n in chosen if (m := _LAYER_INDEX.search("." + n)) and int(m.group(1)) in layers]
    if not chosen:
        raise ValueError(f"target_modules={wanted!r} matches no linear module of this model; "
                         f"its linear modules are: {_short_names(linear)}")
    return chosen


def _linear_modules(model: nn.Module) -> list[str]:
    """Linear layers, counting one already wrapped by an adapter as the layer itself (so a
    second adapter can target it) and never looking inside such wrappers."""
    names, wrapped = [], []
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(module, AdapterLayer):
            wrapped.append(name)
            names.append(name)
        elif isinstance(module, (nn.Linear, *QUANTIZED_BASES)):
            names.append(name)
    return names


def _short_names(names: list[str]) -> str:
    """The distinct last parts of module names, e.g. q_proj, k_proj, ..., lm_head."""
    return ", ".join(sorted({n.split(".")[-1] for n in names})) or "(none)"
