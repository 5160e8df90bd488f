"""Rotary position embeddings: inverse frequencies (scaled as ``config.rope_scaling`` says) and
cos/sin.

The scaling is mlx_core's (``mlx_core.rope_scaling``), shared with the torch zoo; the table is
fp32 like the torch zoo's, so angles agree to fp32 rounding. The length-dependent types
(dynamic NTK, LongRoPE) pick their table inside the traced forward (``rope_inverse_frequencies_at``),
as the torch zoo does.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mlx_core.config import ModelConfig
from mlx_core.rope_scaling import (
    inverse_frequencies_at,
    longrope_inverse_frequencies,
    rope_type,
    scaled_inverse_frequencies,
)


def _np_arange(n):
    return np.arange(n, dtype=np.float32)


def _np_array(values):
    return np.asarray(values, dtype=np.float32)


def rope_inverse_frequencies(config: ModelConfig, local: bool = False) -> np.ndarray:
    """``[head_dim // 2]`` fp32 inverse frequencies, scaled as ``config.rope_scaling`` says
    (dynamic NTK and LongRoPE: the table of short sequences); ``local``: the sliding layers'
    own base ``config.rope_local_theta``, unscaled (Gemma 3)."""
    dim = config.dim_per_head
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    theta = config.rope_local_theta if local else config.rope_theta
    inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)
    if local:
        return inv_freq
    return np.asarray(scaled_inverse_frequencies(
        inv_freq, config.rope_scaling, np.where, arange=_np_arange,
        theta=config.rope_theta, max_position_embeddings=config.max_position_embeddings,
        array=_np_array,
    ), dtype=np.float32)


def rope_inverse_frequencies_at(config: ModelConfig, seq_len):
    """The table of a length-dependent scaling (dynamic NTK, LongRoPE) for ``seq_len`` (an
    integer array ``[..., 1]``: the largest position plus one): ``[..., head_dim // 2]``,
    traceable (``seq_len`` may be a tracer)."""
    scaling = config.rope_scaling
    long_inv_freq = None
    if rope_type(scaling) == "longrope":
        long_inv_freq = jnp.asarray(longrope_inverse_frequencies(
            scaling, "long_factor", _np_arange, _np_array, config.rope_theta), jnp.float32)
    return inverse_frequencies_at(
        jnp.asarray(rope_inverse_frequencies(config)), seq_len, scaling, jnp.where,
        long_inv_freq=long_inv_freq, arange=lambda n: jnp.arange(n, dtype=jnp.float32),
        theta=config.rope_theta, max_position_embeddings=config.max_position_embeddings)


def rope_cos_sin(inv_freq, position_ids, dtype, scale: float = 1.0):
    """cos/sin ``[B, T, head_dim]`` for ``position_ids [B, T]`` (computed in fp32, times
    ``scale``, YaRN's or LongRoPE's attention factor, then cast); ``inv_freq``: one table
    ``[head_dim // 2]``, or one per position ``[B, T, head_dim // 2]``."""
    freqs = position_ids[:, :, None].astype(jnp.float32) * jnp.asarray(inv_freq)
    emb = jnp.concatenate((freqs, freqs), axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.astype(dtype), sin.astype(dtype)
