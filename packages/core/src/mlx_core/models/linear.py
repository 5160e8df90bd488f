"""The zoo's linear layer."""

from __future__ import annotations

import torch
from torch import nn

from mlx_kernels import linear


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, names, init and ``isinstance``, so checkpoints and
    adapters see no difference) whose forward is ``mlx_kernels.linear``, which picks the faster
    GEMM layout for small-batch CPU inference. Options that change how it runs (a prepacked
    weight, an uncopied output layout) are transforms: ``mlx_core.transforms.fast_linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
