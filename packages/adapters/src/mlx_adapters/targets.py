"""Which modules of a torch model an adapter wraps: PEFT's ``target_modules`` rules
(``mlx_core.peft_rules``) over the model's linear layers."""

from __future__ import annotations

from torch import nn

from mlx_adapters.layer import QUANTIZED_BASES, AdapterLayer
from mlx_core.peft_config import PeftConfig
from mlx_core.peft_rules import choose_targets


def find_targets(model: nn.Module, config: PeftConfig) -> list[str]:
    """Names of the ``nn.Linear`` modules to wrap; an error names the candidates if none match."""
    return choose_targets(_linear_modules(model), config.target_modules, config.exclude_modules,
                          config.layers_to_transform)


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
