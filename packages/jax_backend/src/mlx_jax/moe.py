"""Mixtral-style mixture-of-experts feed-forward (names follow Mixtral's checkpoints).

Top-k softmax routing with weights renormalised over the chosen experts, as in the torch zoo.
Every expert runs on every token and the unchosen ones get weight 0: exact, shape-static (so it
jits with no data-dependent control flow), and cheap for the tiny and small MoEs we test; a
grouped-matmul path is the optimisation for large ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mlx_core.config import ModelConfig
from mlx_jax import ops
from mlx_jax.modules import Linear


class Expert(nnx.Module):
    """One gated-SiLU expert: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, hidden: int, intermediate: int, *, dtype, rngs: nnx.Rngs):
        self.w1 = Linear(hidden, intermediate, bias=False, dtype=dtype, rngs=rngs)
        self.w2 = Linear(intermediate, hidden, bias=False, dtype=dtype, rngs=rngs)
        self.w3 = Linear(hidden, intermediate, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.w2(ops.swiglu(self.w1(x), self.w3(x)))


class SparseMoE(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.top_k = config.num_experts_per_tok
        self.gate = Linear(config.hidden_size, config.num_experts, bias=False, dtype=dtype, rngs=rngs)
        self.experts = nnx.List(
            Expert(config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs)
            for _ in range(config.num_experts)
        )

    def __call__(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, chosen = ops.moe_route(self.gate(flat), self.top_k)  # [N, k] each
        # [N, E]: each expert's routing weight per token, 0 where it was not chosen.
        combine = (jax.nn.one_hot(chosen, len(self.experts), dtype=weights.dtype)
                   * weights[..., None]).sum(axis=1)
        out = jnp.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            out = out + (expert(flat) * combine[:, e, None]).astype(out.dtype)
        return out.reshape(shape)
