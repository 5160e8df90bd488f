"""(IA)³ (Liu et al. 2022): learned vectors that rescale a layer's output, or, for
feed-forward layers, its input. PEFT's names: ``<module>.ia3_l.<adapter>``, shaped
``[out, 1]`` (output scaling) or ``[1, in]`` (input scaling)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mlx_adapters.layer import AdapterLayer, wrapped_targets
from mlx_core.peft_config import PeftConfig
from mlx_core.peft_rules import module_matches


@dataclass
class IA3Config(PeftConfig):
    peft_type: str = "IA3"
    feedforward_modules: list[str] | str | None = None  # these scale their input
    init_ia3_weights: bool = True  # ones (the identity); False: random, for tests
    fan_in_fan_out: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.fan_in_fan_out:
            raise ValueError("invalid IA3Config: fan_in_fan_out=True (Conv1D) is not supported")


class IA3Linear(AdapterLayer):
    tables = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, is_feedforward: bool):
        super().__init__(base_layer)
        self.is_feedforward = is_feedforward
        self.ia3_l = nn.ParameterDict()

    def add(self, name: str, config: IA3Config) -> None:
        device, dtype = self._device_dtype()
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        vector = torch.ones(shape, device=device, dtype=dtype)
        if not config.init_ia3_weights:
            nn.init.normal_(vector, mean=1.0, std=0.1)
        self.ia3_l[name] = nn.Parameter(vector)

    def _scale(self, names) -> torch.Tensor | float:
        scale = 1.0
        for name in names:
            scale = scale * self.ia3_l[name].flatten()
        return scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names = [] if self.disabled else self.pending()
        if self.disabled and self.merged_adapters:
            self.unmerge()
        if not names:
            return self.base_layer(x)
        if self.is_feedforward:
            return self.base_layer(x * self._scale(names))
        return self.base_layer(x) * self._scale(names)

    def _merge_one(self, name: str) -> None:
        vector = self.ia3_l[name]  # [1, in] scales W's columns; [out, 1] its rows (and the bias)
        self.base_layer.weight.mul_(vector)
        if not self.is_feedforward and self.base_layer.bias is not None:
            self.base_layer.bias.mul_(vector.flatten())

    def _unmerge_one(self, name: str) -> None:
        vector = self.ia3_l[name]
        self.base_layer.weight.div_(vector)
        if not self.is_feedforward and self.base_layer.bias is not None:
            self.base_layer.bias.div_(vector.flatten())


class IA3Tuner:
    config_class = IA3Config
    layer_class = IA3Linear

    @staticmethod
    def inject(model: nn.Module, config: IA3Config, adapter_name: str, targets: list[str]) -> None:
        def make(name, module):
            return IA3Linear(module, module_matches(name, config.feedforward_modules))

        for _, layer in wrapped_targets(model, targets, IA3Linear, make):
            layer.add(adapter_name, config)
