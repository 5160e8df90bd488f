"""Multi-head latent attention (DeepSeek-V2/V3), as the torch zoo's (``mlx_core.models.mla``):
the same parameter names, the normed latent and the rotated shared RoPE key part in the static
cache (as its "keys" and "values"), expanded through ``kv_b_proj`` over every cache slot at each
step, RoPE's interleaved pairs taken apart (evens, then odds) before the half-split rotation.

The attention op computes values of the queries' width, so the narrower of the two (values, or
queries and keys) is zero-padded to the other's and the output cut back: zeros add nothing to
the scores or the weighted sum, and the scale is given explicitly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mlx_core.config import ModelConfig
from mlx_jax import ops
from mlx_jax.modules import Linear, RMSNorm

_LATENT_NORM_EPS = 1e-6  # HF's DeepSeek norms inside the attention: their own default eps


class MultiHeadLatentAttention(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.num_heads, self.rank = config.num_heads, config.kv_lora_rank
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        h, heads, bias = config.hidden_size, config.num_heads, config.attention_bias
        q_out = heads * config.qk_head_dim
        self.q_lora_rank = config.q_lora_rank
        if self.q_lora_rank is None:
            self.q_proj = Linear(h, q_out, bias=False, dtype=dtype, rngs=rngs)
        else:
            self.q_a_proj = Linear(h, self.q_lora_rank, bias=bias, dtype=dtype, rngs=rngs)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, _LATENT_NORM_EPS, dtype=dtype)
            self.q_b_proj = Linear(self.q_lora_rank, q_out, bias=False, dtype=dtype, rngs=rngs)
        self.kv_a_proj_with_mqa = Linear(h, self.rank + self.rope_dim, bias=bias, dtype=dtype,
                                         rngs=rngs)
        self.kv_a_layernorm = RMSNorm(self.rank, _LATENT_NORM_EPS, dtype=dtype)
        self.kv_b_proj = Linear(self.rank, heads * (self.nope_dim + self.v_dim), bias=False,
                                dtype=dtype, rngs=rngs)
        self.o_proj = Linear(heads * self.v_dim, h, bias=config.attention_out_bias, dtype=dtype,
                             rngs=rngs)
        self.interleaved = config.rope_interleave
        self.scale = config.attention_scale

    def _queries(self, x):
        if self.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def _rotated(self, x, cos_sin):
        if self.interleaved:  # pairs (x0, x1), (x2, x3), ... -> evens then odds
            x = jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)
        return ops.rope(x, *cos_sin)

    def __call__(self, x, cos_sin, mask, layer_cache=None):
        """As ``mlx_jax.transformer.Attention``: ``layer_cache`` is (latents ``[B, 1, S, rank]``,
        rope keys ``[B, 1, S, rope_dim]``, write position) or None."""
        b, t, _ = x.shape
        q = self._queries(x).reshape(b, t, self.num_heads, -1).transpose(0, 2, 1, 3)
        q_nope, q_rope = q[..., :self.nope_dim], q[..., self.nope_dim:]
        compressed = self.kv_a_proj_with_mqa(x)
        latent = self.kv_a_layernorm(compressed[..., :self.rank])[:, None]  # [B, 1, T, rank]
        k_rope = self._rotated(compressed[..., self.rank:][:, None], cos_sin)
        q_rope = self._rotated(q_rope, cos_sin)
        updated = None
        if layer_cache is not None:
            latents, rope_keys, start = layer_cache
            latent = jax.lax.dynamic_update_slice(latents, latent.astype(latents.dtype),
                                                  (0, 0, start, 0))
            k_rope = jax.lax.dynamic_update_slice(rope_keys, k_rope.astype(rope_keys.dtype),
                                                  (0, 0, start, 0))
            updated = (latent, k_rope)
        s = latent.shape[2]
        kv = self.kv_b_proj(latent[:, 0]).reshape(b, s, self.num_heads, -1).transpose(0, 2, 1, 3)
        k_nope, v = kv[..., :self.nope_dim], kv[..., self.nope_dim:]
        k = jnp.concatenate(
            [k_nope, jnp.broadcast_to(k_rope, (b, self.num_heads, s, self.rope_dim))], axis=-1)
        q = jnp.concatenate([q_nope, q_rope], axis=-1)
        width = max(q.shape[-1], self.v_dim)
        out = ops.attention(_padded(q, width), _padded(k, width), _padded(v, width), mask,
                            scale=self.scale)[..., :self.v_dim]
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, t, self.num_heads * self.v_dim)), updated


def _padded(x, width: int):
    extra = width - x.shape[-1]
    return x if extra == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])
