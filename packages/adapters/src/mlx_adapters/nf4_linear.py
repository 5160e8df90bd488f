"""QLoRA's base layer: an ``nn.Linear`` whose frozen weight is stored in NF4 (4-bit NormalFloat
with double-quantized absmax, ``mlx_kernels.nf4_quantize``) and de-quantized on the fly."""

from __future__ import annotations

import torch
from torch import nn

from mlx_core.peft_rules import OUTPUT_HEADS
from mlx_kernels import NF4Weight, nf4_dequantize, nf4_matmul, nf4_quantize


class NF4Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q = nf4_quantize(linear.weight.detach())
        # buffers, not parameters: saved and moved with the module, never trained
        self.register_buffer("codes", q.codes)
        self.register_buffer("absmax_q", q.absmax_q)
        self.register_buffer("absmax_scale", q.absmax_scale)
        self.register_buffer("absmax_offset", q.absmax_offset)
        self.compute_dtype = linear.weight.dtype
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                  requires_grad=False)

    @property
    def nf4(self) -> NF4Weight:
        return NF4Weight(self.codes, self.absmax_q, self.absmax_scale, self.absmax_offset,
                         (self.out_features, self.in_features), self.compute_dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return nf4_dequantize(self.nf4)

    def dequantized(self) -> nn.Linear:
        """An ``nn.Linear`` holding the de-quantized weight (for merging adapters into it)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.codes.device, dtype=self.compute_dtype)
        with torch.no_grad():
            linear.weight.copy_(nf4_dequantize(self.nf4))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.requires_grad_(False)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_matmul(x, self.nf4, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"


def quantize_nf4(model: nn.Module, skip: tuple[str, ...] = tuple(sorted(OUTPUT_HEADS))) -> nn.Module:
    """Replace every ``nn.Linear`` (except output heads) by an ``NF4Linear``, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.split(".")[-1] not in skip:
            if module.weight.numel() % 64:
                continue  # NF4 blocks are 64 values; such odd layers stay in full precision
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, NF4Linear(module))
    return model
