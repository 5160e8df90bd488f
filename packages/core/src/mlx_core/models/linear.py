"""The zoo's linear layer."""

from __future__ import annotations

import torch
from torch import nn

from mlx_kernels import linear


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, names, init and ``isinstance``, so checkpoints and
    adapters see no difference) whose forward is ``mlx_kernels.linear``, which picks the faster
    GEMM layout for small-batch CPU inference.

    ``contiguous_output = False`` (set by the MLPs on the projections whose output only an
    activation and the next projection read) lets that GEMM's transposed result out uncopied."""

    contiguous_output = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, contiguous=self.contiguous_output)
