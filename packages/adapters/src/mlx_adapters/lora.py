"""LoRA: the layer that wraps an ``nn.Linear`` and the tuner that injects, merges and unmerges.

Names follow PEFT (``q_proj.base_layer``, ``q_proj.lora_A.<adapter>``, ``q_proj.lora_B.<adapter>``)
so state dicts and saved adapters map one to one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mlx_adapters.layer import QUANTIZED_BASES, AdapterLayer, wrapped_targets
from mlx_core.peft_config import LoraConfig, pissa_iterations
from mlx_kernels import lora_linear


class DoraMagnitude(nn.Module):
    """DoRA's learned magnitude ``m`` (one per output row); a module so its name is PEFT's
    ``lora_magnitude_vector.<adapter>.weight``."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)


class LoraLinear(AdapterLayer):
    """``base_layer(x) + sum over active adapters of scaling * B(A(dropout(x)))``.

    The base is an ``nn.Linear`` or a quantized layer (QLoRA's ``NF4Linear``, mlx_core's
    int8/int4 layers); merging into a quantized base first replaces it by its de-quantized
    ``nn.Linear``.
    """

    tables = ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only
        self.dora_factors: dict[str, torch.Tensor] = {}  # m / ||W + dW|| of merged DoRA adapters
        self.scaling: dict[str, float] = {}

    def add(self, name: str, r: int, alpha: float, config: LoraConfig) -> None:
        device, dtype = self._device_dtype()
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=config.lora_bias, device=device,
                                      dtype=dtype)
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.scaling[name] = alpha / (math.sqrt(r) if config.use_rslora else r)
        with torch.no_grad():
            self._init(name, config.init_lora_weights)
        if config.use_dora:
            with torch.no_grad():
                self.lora_magnitude_vector[name] = DoraMagnitude(self._dora_norm(name))

    def _dora_norm(self, name: str) -> torch.Tensor:
        """Row norms of ``W + s B A``, detached (DoRA section 4.3)."""
        weight = self.base_weight() + self.delta_weight(name).to(self.base_weight().dtype)
        return torch.linalg.norm(weight, dim=1).detach()

    def _init(self, name: str, how) -> None:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if how == "olora" or pissa_iterations(how) is not None:
            return self._init_from_base(name, how)
        if how is False:  # PEFT's "not recommended, for tests": A, B (and B's bias) keep the
            return        # random init nn.Linear drew above, the same draws as PEFT's
        if how == "gaussian":
            nn.init.normal_(a, std=1 / self.lora_A[name].out_features)
        else:  # PeftConfig's default: A like nn.Linear's kaiming-uniform
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)
        if self.lora_B[name].bias is not None:
            nn.init.zeros_(self.lora_B[name].bias)

    def _init_from_base(self, name: str, how: str) -> None:
        """PiSSA (Meng et al. 2024) or OLoRA (Büyükakyüz 2024): A and B from a factorisation of
        the base weight W, and W replaced by the residual ``W - s B A`` so the adapted layer
        starts out equal to the original. Computed in fp32, as PEFT does."""
        if isinstance(self.base_layer, QUANTIZED_BASES):
            raise ValueError(f"init_lora_weights={how!r} rewrites the base weight, which a quantized base "
                             "cannot hold exactly: initialise the adapter on the full-precision model "
                             "first, then quantize the residual (quantize_nf4)")
        weight = self.base_layer.weight
        r, scale = self.lora_A[name].out_features, self.scaling[name]
        w = weight.detach().float()
        if how == "olora":
            q, upper = torch.linalg.qr(w)
            a, b = upper[:r], q[:, :r]
        else:
            niter = pissa_iterations(how)
            if niter == 0:
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                u, s, vh = u[:, :r], s[:r], vh[:r]
            else:  # randomized: draws from torch's generator, as PEFT does
                u, s, v = torch.svd_lowrank(w, r, niter=niter)
                vh = v.t()
            root = torch.sqrt(s / scale)
            a, b = root[:, None] * vh, u * root[None, :]
        self.lora_A[name].weight.copy_(a)
        self.lora_B[name].weight.copy_(b)
        weight.copy_((w - (scale * b) @ a).to(weight.dtype))  # PEFT's order of operations

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)

    def _merge_one(self, name: str) -> None:
        weight = self.base_layer.weight
        delta = self.delta_weight(name).to(weight.dtype)
        if self.lora_B[name].bias is not None:
            if self.base_layer.bias is None:
                raise RuntimeError(f"cannot merge adapter {name!r}: it has lora_bias=True but the base "
                                   "layer has no bias to fold it into")
            self.base_layer.bias.add_(self.scaling[name] * self.lora_B[name].bias)
        if name in self.lora_magnitude_vector:  # W' = m / ||W + dW|| * (W + dW)
            factor = self.lora_magnitude_vector[name].weight / self._dora_norm(name)
            self.dora_factors[name] = factor
            weight.add_(delta).mul_(factor[:, None])
        else:
            weight.add_(delta)

    def _unmerge_one(self, name: str) -> None:
        weight = self.base_layer.weight
        if name in self.dora_factors:
            weight.div_(self.dora_factors.pop(name)[:, None])
        weight.sub_(self.delta_weight(name).to(weight.dtype))
        if self.lora_B[name].bias is not None:
            self.base_layer.bias.sub_(self.scaling[name] * self.lora_B[name].bias)

    def delete(self, name: str) -> None:
        super().delete(name)
        self.scaling.pop(name, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x)
        pending = self.pending()
        fusable = isinstance(self.base_layer, nn.Linear) and not self.lora_magnitude_vector
        if fusable and len(pending) == 1 and isinstance(self.lora_dropout[pending[0]], nn.Identity):
            name = pending[0]  # the common case: one fused base + low-rank op
            return lora_linear(x, self.base_layer.weight, self.lora_A[name].weight,
                               self.lora_B[name].weight, self.scaling[name], self._fused_bias(name))
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

    def _fused_bias(self, name: str) -> torch.Tensor | None:
        """The base bias, plus ``scaling * lora_B.bias`` with ``lora_bias=True`` (its place in
        ``base + scaling * B(A x)``, where B's bias is scaled with the rest)."""
        bias, lora_bias = self.base_layer.bias, self.lora_B[name].bias
        if lora_bias is None:
            return bias
        scaled = self.scaling[name] * lora_bias
        return scaled if bias is None else bias + scaled

    def _dora_extra(self, name, x, dropped, base_result, lora_result):
        """What DoRA adds to the base output: ``(m/||W+dW|| - 1) W x + m/||W+dW|| * s B A x``."""
        scale = (self.lora_magnitude_vector[name].weight / self._dora_norm(name)).view(1, -1)
        if dropped is x:  # reuse the base output, without its bias
            bias = self.base_layer.bias
            base = base_result if bias is None else base_result - bias
        else:
            base = F.linear(dropped, self.base_weight().to(x.dtype))
        return (scale - 1) * base + scale * lora_result * self.scaling[name]


class LoraTuner:
    """The LoRA method for the registry: how to inject it, and its config class."""

    config_class = LoraConfig
    layer_class = LoraLinear

    @staticmethod
    def inject(model: nn.Module, config: LoraConfig, adapter_name: str, targets: list[str]) -> None:
        for name, layer in wrapped_targets(model, targets, LoraLinear, lambda _, m: LoraLinear(m)):
            r, alpha = config.rank_and_alpha(name)
            layer.add(adapter_name, r, alpha, config)
