"""The zoo's hot ops: ``mlx_kernels.jax``'s, one definition shared with the kernels package (torch
free, tested against the torch kernels' references), plus LayerNorm, which has no kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlx_kernels.jax import (
    attention,
    fused_linear_cross_entropy,
    geglu,
    gelu_tanh,
    lora_linear,
    moe_route,
    rms_norm,
    rope,
    swiglu,
)


def layer_norm(x, weight, bias, eps: float):
    """torch.nn.LayerNorm's math (biased variance), in fp32."""
    h = x.astype(jnp.float32)
    mean = h.mean(-1, keepdims=True)
    var = jnp.square(h - mean).mean(-1, keepdims=True)
    return ((h - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype) * weight + bias


__all__ = ["attention", "fused_linear_cross_entropy", "geglu", "gelu_tanh", "layer_norm", "lora_linear",
           "moe_route", "rms_norm", "rope", "swiglu"]
