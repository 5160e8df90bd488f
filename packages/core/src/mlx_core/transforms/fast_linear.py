"""Transforms for CPU inference that leave every logit as it was (to fp32 rounding):

- ``prepack_linear_weights``: a oneDNN-packed copy of each linear weight, used by
  ``mlx_kernels.linear`` in fp32 CPU inference (faster GEMMs, most at a decode step's few rows;
  as much memory again as the weights). The serving engine applies it.
- ``uncopied_mlp_outputs``: the MLP projections whose output only the activation and the next
  projection read may return the transposed GEMM's result uncopied (``linear(contiguous=False)``).
  ``load_model`` and the serving engine apply it.

Both swap the layers for ``FastLinear``, the zoo ``Linear`` with these two options, sharing the
layer's parameters: checkpoints, adapters and autograd see no difference.
"""

from __future__ import annotations

import torch
from torch import nn

from mlx_core.models.linear import Linear
from mlx_core.transforms.swap import swap_linears
from mlx_kernels import linear
from mlx_kernels.linear import pack_weight, packing_pays_off


class FastLinear(Linear):
    """``Linear`` with a prepacked weight (``packed_weight``, not a parameter or buffer) and/or
    a transposed output layout allowed (``contiguous_output = False``)."""

    contiguous_output = True
    packed_weight = None

    @classmethod
    def of(cls, layer: nn.Linear) -> FastLinear:
        """``layer`` itself if it is one, else a ``FastLinear`` over the same parameters."""
        if isinstance(layer, cls):
            return layer
        fast = cls(layer.in_features, layer.out_features, bias=False, device="meta")
        fast.weight, fast.bias = layer.weight, layer.bias
        return fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, contiguous=self.contiguous_output,
                      packed=self.packed_weight)


def prepack_linear_weights(model: nn.Module, *, calibrate: bool = True) -> int:
    """Give the full-precision linear layers of ``model`` a prepacked copy of their weights for
    CPU fp32 inference; returns the bytes the copies take. With ``calibrate`` only the weight
    shapes for which packing measures faster on this machine are packed (one timing per shape,
    ``packing_pays_off``); without, all. Weights on another device or in another dtype get none.
    Training and autograd are unaffected (they never take the packed path)."""
    pays_off: dict[tuple[int, ...], bool] = {}
    total = 0

    def build(name: str, layer: nn.Linear) -> nn.Module | None:
        nonlocal total
        if getattr(layer, "packed_weight", None) is not None:
            return None
        if type(layer) not in (nn.Linear, Linear, FastLinear):
            return None  # a layer with more to it (a router's bias, a vocab-parallel head's gather)
        if ".experts." in f".{name}":  # a full-precision MoE runs its stacked expert weights
            return None
        shape = tuple(layer.weight.shape)
        if calibrate and shape not in pays_off:
            pays_off[shape] = packing_pays_off(layer.weight)
        if (calibrate and not pays_off[shape]) or (packed := pack_weight(layer.weight)) is None:
            return None
        fast = FastLinear.of(layer)
        fast.packed_weight = packed
        total += layer.weight.numel() * layer.weight.element_size()
        return fast

    swap_linears(model, build)
    return total


def uncopied_mlp_outputs(model: nn.Module) -> nn.Module:
    """Let the gate/up projections of the zoo's MLPs (read only by the activation and the down
    projection) return the transposed GEMM's output uncopied; returns ``model``."""
    from mlx_core.models.transformer import GatedMLP, GeluMLP

    for mlp in [m for m in model.modules() if isinstance(m, (GatedMLP, GeluMLP))]:
        for name in ("gate_proj", "up_proj"):
            layer = getattr(mlp, name, None)
            if isinstance(layer, nn.Linear):
                fast = FastLinear.of(layer)
                fast.contiguous_output = False
                setattr(mlp, name, fast)
    return model
