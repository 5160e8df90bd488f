"""LoRA: the layer that wraps an ``nn.Linear`` and the tuner that injects, merges and unmerges.

Names follow PEFT (``q_proj.base_layer``, ``q_proj.lora_A.<adapter>``, ``q_proj.lora_B.<adapter>``)
so state dicts and saved adapters map one to one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mlx_adapters.config import LoraConfig
from mlx_adapters.nf4_linear import NF4Linear
from mlx_kernels import lora_linear, nf4_dequantize


class DoraMagnitude(nn.Module):
    """DoRA's learned magnitude ``m`` (one per output row); a module so its name is PEFT's
    ``lora_magnitude_vector.<adapter>.weight``."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)


class LoraLinear(nn.Module):
    """``base_layer(x) + sum over active adapters of scaling * B(A(dropout(x)))``.

    The base is an ``nn.Linear`` or, for QLoRA, an ``NF4Linear``; merging into a 4-bit base
    first replaces it by its de-quantized ``nn.Linear`` (merging into 4 bits would be lossy).
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only
        self.dora_factors: dict[str, torch.Tensor] = {}  # m / ||W + dW|| of merged DoRA adapters
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def add(self, name: str, r: int, alpha: float, config: LoraConfig) -> None:
        w = self.base_layer.weight if isinstance(self.base_layer, nn.Linear) else self.base_layer.absmax_scale
        dtype = getattr(self.base_layer, "compute_dtype", w.dtype)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=dtype)
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.scaling[name] = alpha / (math.sqrt(r) if config.use_rslora else r)
        self._init(name, config.init_lora_weights)
        if config.use_dora:
            with torch.no_grad():
                self.lora_magnitude_vector[name] = DoraMagnitude(self._dora_norm(name))

    def base_weight(self) -> torch.Tensor:
        if isinstance(self.base_layer, NF4Linear):
            return nf4_dequantize(self.base_layer.nf4)
        return self.base_layer.weight

    def _dora_norm(self, name: str) -> torch.Tensor:
        """Row norms of ``W + s B A``, detached (DoRA section 4.3)."""
        weight = self.base_weight() + self.delta_weight(name).to(self.base_weight().dtype)
        return torch.linalg.norm(weight, dim=1).detach()

    def _init(self, name: str, how) -> None:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if how == "gaussian":
            nn.init.normal_(a, std=1 / self.lora_A[name].out_features)
        else:  # PEFT's default: A like nn.Linear's kaiming-uniform
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if how is False:  # random B too (PEFT's "not recommended, for tests")
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)

    def merge(self, names: list[str]) -> None:
        if isinstance(self.base_layer, NF4Linear) and names:
            self.base_layer = self.base_layer.dequantized()
        with torch.no_grad():
            for name in names:
                if name in self.merged_adapters:
                    continue
                weight = self.base_layer.weight
                delta = self.delta_weight(name).to(weight.dtype)
                if name in self.lora_magnitude_vector:  # W' = m / ||W + dW|| * (W + dW)
                    factor = self.lora_magnitude_vector[name].weight / self._dora_norm(name)
                    self.dora_factors[name] = factor
                    weight.add_(delta).mul_(factor[:, None])
                else:
                    weight.add_(delta)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                weight = self.base_layer.weight
                if name in self.dora_factors:
                    weight.div_(self.dora_factors.pop(name)[:, None])
                weight.sub_(self.delta_weight(name).to(weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x)
        pending = [n for n in self.active_adapters if n not in self.merged_adapters and n in self.lora_A]
        fusable = isinstance(self.base_layer, nn.Linear) and not self.lora_magnitude_vector
        if fusable and len(pending) == 1 and isinstance(self.lora_dropout[pending[0]], nn.Identity):
            name = pending[0]  # the common case: one fused base + low-rank op
            return lora_linear(x, self.base_layer.weight, self.lora_A[name].weight,
                               self.lora_B[name].weight, self.scaling[name], self.base_layer.bias)
        y = self.base_layer(x)
        base_result = y
        for name in pending:
            dropped = self.lora_dropout[name](x)
            lora_result = self.lora_B[name](self.lora_A[name](dropped))
            if name in self.lora_magnitude_vector:
                y = y + self._dora_extra(name, x, dropped, base_result, lora_result)
            else:
                y = y + self.scaling[name] * lora_result
        return y

    def _dora_extra(self, name, x, dropped, base_result, lora_result):
        """What DoRA adds to the base output: ``(m/||W+dW|| - 1) W x + m/||W+dW|| * s B A x``."""
        scale = (self.lora_magnitude_vector[name].weight / self._dora_norm(name)).view(1, -1)
        if dropped is x:  # reuse the base output, without its bias
            bias = self.base_layer.bias
            base = base_result if bias is None else base_result - bias
        else:
            base = F.linear(dropped, self.base_weight().to(x.dtype))
        return (scale - 1) * base + scale * lora_result * self.scaling[name]

    def extra_repr(self) -> str:
        return f"adapters={list(self.lora_A)}, active={self.active_adapters}, merged={self.merged_adapters}"


class LoraTuner:
    """The LoRA method for the registry: how to inject it, and its config class."""

    config_class = LoraConfig
    layer_class = LoraLinear

    @staticmethod
    def inject(model: nn.Module, config: LoraConfig, adapter_name: str, targets: list[str]) -> None:
        for name in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            module = getattr(parent, child)
            if not isinstance(module, LoraLinear):
                module = LoraLinear(module)
                setattr(parent, child, module)
            r, alpha = config.rank_and_alpha(name)
            module.add(adapter_name, r, alpha, config)
