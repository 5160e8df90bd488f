"""The zoo's linear layer."""

from __future__ import annotations

import torch
from torch import nn

from mlx_kernels import linear
from mlx_kernels.linear import pack_weight, packing_pays_off


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, names, init and ``isinstance``, so checkpoints and
    adapters see no difference) whose forward is ``mlx_kernels.linear``, which picks the faster
    GEMM layout for small-batch CPU inference.

    ``contiguous_output = False`` (set by the MLPs on the projections whose output only an
    activation and the next projection read) lets that GEMM's transposed result out uncopied.
    ``packed_weight`` (set by ``prepack_linear_weights``) is the weight prepacked for CPU
    inference; it is not a parameter or buffer, so checkpoints do not see it either."""

    contiguous_output = True
    packed_weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, contiguous=self.contiguous_output,
                      packed=self.packed_weight)


def prepack_linear_weights(model: nn.Module, *, calibrate: bool = True) -> int:
    """Give the zoo ``Linear`` layers of ``model`` a prepacked copy of their weights, used for
    CPU fp32 inference (``mlx_kernels.linear``: faster GEMMs on many CPUs, most at the few rows
    of a decode step); returns the bytes the copies take. With ``calibrate`` only the weight
    shapes for which packing measures faster on this machine are packed (one timing per shape,
    ``packing_pays_off``); without, all. Weights on another device or in another dtype get none.
    Training and autograd are unaffected (they never take the packed path)."""
    pays_off: dict[tuple[int, ...], bool] = {}
    total = 0
    for module in model.modules():
        if not isinstance(module, Linear) or module.packed_weight is not None:
            continue
        shape = tuple(module.weight.shape)
        if calibrate and shape not in pays_off:
            pays_off[shape] = packing_pays_off(module.weight)
        if calibrate and not pays_off[shape]:
            continue
        module.packed_weight = pack_weight(module.weight)
        if module.packed_weight is not None:
            total += module.weight.numel() * module.weight.element_size()
    return total
