"""Mixtral-style mixture-of-experts feed-forward (names follow Mixtral's checkpoints)."""

from __future__ import annotations

import torch
from torch import nn

from mlx_core.config import ModelConfig
from mlx_core.models.linear import Linear
from mlx_kernels import moe_route, swiglu


class Expert(nn.Module):
    """One gated-SiLU expert: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.w1 = Linear(hidden, intermediate, bias=False)
        self.w2 = Linear(intermediate, hidden, bias=False)
        self.w3 = Linear(hidden, intermediate, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x)))


class SparseMoE(nn.Module):
    """Top-k softmax routing (weights renormalised over the chosen experts), then a weighted
    sum of the chosen experts' outputs. Each expert runs only on the tokens routed to it."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            Expert(config.hidden_size, config.intermediate_size) for _ in range(config.num_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, chosen = moe_route(self.gate(flat), self.top_k)
        out = torch.zeros_like(flat)
        for expert_id in chosen.unique().tolist():
            token_idx, slot = torch.where(chosen == expert_id)
            y = self.experts[expert_id](flat[token_idx]) * weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out.reshape(shape)
