"""Rotary position embeddings: inverse frequencies (scaled as ``config.rope_scaling`` says, by
``mlx_core.rope_scaling``) and cos/sin."""

from __future__ import annotations

import torch

from mlx_core.config import ModelConfig
from mlx_core.rope_scaling import (
    inverse_frequencies_at,
    longrope_inverse_frequencies,
    scaled_inverse_frequencies,
)


def _arange(device="cpu"):
    return lambda n: torch.arange(n, dtype=torch.float32, device=device)


def _array(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device="cpu")


def rope_inverse_frequencies(config: ModelConfig, local: bool = False) -> torch.Tensor:
    """``[head_dim // 2]`` fp32 inverse frequencies, scaled as ``config.rope_scaling`` says
    (dynamic NTK and LongRoPE: the table of short sequences, see ``rope_inverse_frequencies_at``);
    ``local``: the sliding layers' own base ``config.rope_local_theta``, unscaled (Gemma 3)."""
    dim = config.dim_per_head
    # Explicitly on CPU: models are built under torch.device("meta") before loading weights.
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    if local:
        return 1.0 / (config.rope_local_theta**exponents)
    return scaled_inverse_frequencies(
        1.0 / (config.rope_theta**exponents), config.rope_scaling, torch.where,
        arange=_arange(), theta=config.rope_theta,
        max_position_embeddings=config.max_position_embeddings, array=_array)


def rope_long_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """LongRoPE's table past ``original_max_position_embeddings`` (the long factors')."""
    return longrope_inverse_frequencies(config.rope_scaling, "long_factor", _arange(), _array,
                                        config.rope_theta)


def rope_inverse_frequencies_at(config: ModelConfig, inv_freq: torch.Tensor,
                                long_inv_freq: torch.Tensor | None,
                                seq_len: torch.Tensor) -> torch.Tensor:
    """The table for ``seq_len`` (long ``[..., 1]``: the largest position plus one) of a
    length-dependent scaling (dynamic NTK, LongRoPE): ``[..., head_dim // 2]``, by tensor ops
    only (the compiled decode step traces it)."""
    return inverse_frequencies_at(
        inv_freq, seq_len, config.rope_scaling, torch.where, long_inv_freq=long_inv_freq,
        arange=_arange(seq_len.device), theta=config.rope_theta,
        max_position_embeddings=config.max_position_embeddings)


def rope_cos_sin(
    inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[B, T, head_dim]`` for ``position_ids [B, T]`` (computed in fp32, times
    ``scale``, YaRN's or LongRoPE's attention factor, then cast); ``inv_freq``: one table
    ``[head_dim // 2]``, or one per position ``[B, T, head_dim // 2]``."""
    freqs = position_ids[:, :, None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)
