"""Rotary position embeddings: inverse frequencies (with Llama 3 / linear scaling) and cos/sin."""

from __future__ import annotations

import torch

from mlx_core.config import ModelConfig
from mlx_core.rope_scaling import scaled_inverse_frequencies


def rope_inverse_frequencies(config: ModelConfig, local: bool = False) -> torch.Tensor:
    """``[head_dim // 2]`` fp32 inverse frequencies, scaled as ``config.rope_scaling`` says;
    ``local``: the sliding layers' own base ``config.rope_local_theta``, unscaled (Gemma 3)."""
    dim = config.dim_per_head
    # Explicitly on CPU: models are built under torch.device("meta") before loading weights.
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    if local:
        return 1.0 / (config.rope_local_theta**exponents)
    return scaled_inverse_frequencies(
        1.0 / (config.rope_theta**exponents), config.rope_scaling, torch.where,
        arange=lambda n: torch.arange(n, dtype=torch.float32, device="cpu"),
        theta=config.rope_theta, max_position_embeddings=config.max_position_embeddings)


def rope_cos_sin(
    inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[B, T, head_dim]`` for ``position_ids [B, T]`` (computed in fp32, times
    ``scale``, YaRN's attention factor, then cast)."""
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :].float()
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)
