"""Rotary position embeddings: inverse frequencies (with Llama 3 / linear scaling) and cos/sin.

The same math as ``mlx_core.models.rope``, in fp32 like the torch zoo, so angles agree.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from mlx_core.config import ModelConfig


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """``[head_dim // 2]`` fp32 inverse frequencies, scaled as ``config.rope_scaling`` says."""
    dim = config.dim_per_head
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(config.rope_theta), exponents)).astype(np.float32)
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    if rope_type == "llama3":
        return _llama3_scaled(inv_freq, scaling)
    return inv_freq


def _llama3_scaled(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    """Llama 3.1's frequency-dependent scaling: long wavelengths slowed, short ones kept."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(inv_freq, position_ids, dtype):
    """cos/sin ``[B, T, head_dim]`` for ``position_ids [B, T]`` (computed in fp32, then cast)."""
    freqs = position_ids[:, :, None].astype(jnp.float32) * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate((freqs, freqs), axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)
