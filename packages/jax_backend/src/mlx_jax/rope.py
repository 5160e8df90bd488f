"""Rotary position embeddings: inverse frequencies (with Llama 3 / linear scaling) and cos/sin.

The scaling is mlx_core's (``mlx_core.rope_scaling``), shared with the torch zoo; the table is
fp32 like the torch zoo's, so angles agree to fp32 rounding.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mlx_core.config import ModelConfig
from mlx_core.rope_scaling import scaled_inverse_frequencies


def rope_inverse_frequencies(config: ModelConfig, local: bool = False) -> np.ndarray:
    """``[head_dim // 2]`` fp32 inverse frequencies, scaled as ``config.rope_scaling`` says;
    ``local``: the sliding layers' own base ``config.rope_local_theta``, unscaled (Gemma 3)."""
    dim = config.dim_per_head
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    theta = config.rope_local_theta if local else config.rope_theta
    inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)
    if local:
        return inv_freq
    return scaled_inverse_frequencies(
        inv_freq, config.rope_scaling, np.where, arange=lambda n: np.arange(n, dtype=np.float32),
        theta=config.rope_theta, max_position_embeddings=config.max_position_embeddings,
    ).astype(np.float32)


def rope_cos_sin(inv_freq, position_ids, dtype, scale: float = 1.0):
    """cos/sin ``[B, T, head_dim]`` for ``position_ids [B, T]`` (computed in fp32, times
    ``scale``, YaRN's attention factor, then cast)."""
    freqs = position_ids[:, :, None].astype(jnp.float32) * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate((freqs, freqs), axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.astype(dtype), sin.astype(dtype)
