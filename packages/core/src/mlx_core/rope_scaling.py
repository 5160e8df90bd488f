"""RoPE's frequency scaling (``config.rope_scaling``: linear, Llama 3.1's, YaRN), written once
for any array library: the torch zoo passes ``torch.where`` (and ``torch.arange``), torch-free
backends numpy's.

Only Python scalars meet the arrays here, so each library keeps the table's dtype (fp32) and
its own rounding; the base table ``1 / theta ** (2i / d)`` stays with each backend, computed as
that backend's reference computes it (torch's as HF transformers does, to the last bit).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


def scaled_inverse_frequencies(inv_freq, scaling: dict[str, Any] | None, where: Callable, *,
                               arange: Callable | None = None, theta: float | None = None,
                               max_position_embeddings: int | None = None):
    """``inv_freq [head_dim // 2]`` scaled as ``scaling`` says (None or ``"default"``: as is).
    YaRN also needs ``arange(n)`` (fp32 0..n-1 in the array library), the RoPE base ``theta``
    and the model's ``max_position_embeddings``."""
    scaling = scaling or {}
    rope_type = _rope_type(scaling)
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_scaled(inv_freq, scaling, where)
    if rope_type == "yarn":
        return _yarn_scaled(inv_freq, scaling, where, arange, theta, max_position_embeddings)
    return inv_freq


def rope_attention_factor(scaling: dict[str, Any] | None,
                          max_position_embeddings: int | None = None) -> float:
    """What cos and sin are multiplied by: 1, or YaRN's ``attention_factor`` (given, or from
    ``factor``, ``mscale`` and ``mscale_all_dim``, as HF transformers infers it)."""
    scaling = scaling or {}
    if _rope_type(scaling) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = _yarn_factor(scaling, max_position_embeddings)
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
    return _yarn_mscale(factor)


def _rope_type(scaling: dict[str, Any]) -> str:
    return scaling.get("rope_type", scaling.get("type", "default"))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_factor(scaling: dict[str, Any], max_position_embeddings: int | None) -> float:
    if scaling.get("factor") is not None:
        return float(scaling["factor"])
    return max_position_embeddings / scaling["original_max_position_embeddings"]


def _yarn_scaled(inv_freq, scaling, where, arange, theta, max_position_embeddings):
    """YaRN: long wavelengths interpolated (divided by ``factor``), short ones kept, a linear
    ramp between the dimensions ``beta_fast`` and ``beta_slow`` rotations apart."""
    if arange is None or theta is None:
        raise ValueError("YaRN RoPE scaling needs arange and theta")
    factor = _yarn_factor(scaling, max_position_embeddings)
    original = scaling.get("original_max_position_embeddings") or max_position_embeddings
    dim = 2 * inv_freq.shape[0]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = (arange(dim // 2) - low) / (high - low)
    ramp = where(ramp < 0, ramp * 0, where(ramp > 1, ramp * 0 + 1, ramp))
    extrapolated = 1 - ramp  # the share of each dimension left unscaled
    return inv_freq / factor * (1 - extrapolated) + inv_freq * extrapolated


def _llama3_scaled(inv_freq, scaling: dict[str, Any], where: Callable):
    """Llama 3.1's frequency-dependent scaling: long wavelengths slowed, short ones kept."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return where(is_medium, smoothed, scaled)
