"""The hot ops, as ``mlx_kernels.jax`` defines them.

``mlx_kernels`` still imports torch (its ``jax`` module shares constants with the torch NF4
code), and mlx-jax must work without torch, so when it cannot be imported the same ``jax.numpy``
references are used from here. Delete the fallback once ``mlx_kernels.jax`` is torch-free.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

try:
    from mlx_kernels.jax import (
        fused_linear_cross_entropy,
        gelu_tanh,
        moe_route,
        rms_norm,
        rope,
        swiglu,
    )
except ImportError:  # torch (or mlx-kernels) absent

    def rms_norm(x, weight, eps: float = 1e-6):
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
        return weight * h.astype(x.dtype)

    def rope(x, cos, sin):
        """``x [B, H, T, D]``, ``cos/sin [B, T, D]`` (HF's rotate_half convention)."""
        x1, x2 = jnp.split(x, 2, axis=-1)
        rotated = jnp.concatenate((-x2, x1), axis=-1)
        return x * cos[:, None] + rotated * sin[:, None]

    def swiglu(gate, up):
        return jax.nn.silu(gate) * up

    def gelu_tanh(x):
        return jax.nn.gelu(x, approximate=True)

    def moe_route(router_logits, top_k: int, renormalize: bool = True):
        probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
        weights, experts = jax.lax.top_k(probs, top_k)
        if renormalize:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        return weights, experts

    def fused_linear_cross_entropy(hidden, weight, labels, *, bias=None, ignore_index: int = -100,
                                   label_smoothing: float = 0.0, reduction: str = "mean",
                                   chunk_size: int = 256):
        """Chunked over tokens with ``jax.checkpoint`` per chunk, so neither the forward nor the
        gradient keeps the full ``[N, V]`` logits."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        n, vocab = hidden.shape[0], weight.shape[0]
        pad = -n % chunk_size
        h = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(-1, chunk_size, hidden.shape[1])
        y = jnp.pad(labels, (0, pad), constant_values=ignore_index).reshape(-1, chunk_size)

        @jax.checkpoint
        def chunk_loss(h_chunk, y_chunk):
            logits = (h_chunk @ weight.T).astype(jnp.float32)
            if bias is not None:
                logits = logits + bias
            lse = jax.nn.logsumexp(logits, axis=-1)
            keep = y_chunk != ignore_index
            target = jnp.take_along_axis(logits, jnp.clip(y_chunk, 0, vocab - 1)[:, None], axis=-1)[:, 0]
            loss = lse - target
            if label_smoothing:
                loss = (1 - label_smoothing) * loss + label_smoothing * (lse - logits.mean(-1))
            return jnp.where(keep, loss, 0.0).sum()

        total = jax.lax.map(lambda args: chunk_loss(*args), (h, y)).sum()
        if reduction == "mean":
            return total / (labels != ignore_index).sum()
        return total


def layer_norm(x, weight, bias, eps: float):
    """torch.nn.LayerNorm's math (biased variance), in fp32."""
    h = x.astype(jnp.float32)
    mean = h.mean(-1, keepdims=True)
    var = jnp.square(h - mean).mean(-1, keepdims=True)
    return ((h - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype) * weight + bias


__all__ = ["fused_linear_cross_entropy", "gelu_tanh", "layer_norm", "moe_route", "rms_norm", "rope", "swiglu"]
