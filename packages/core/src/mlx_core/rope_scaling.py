"""RoPE's frequency scaling (``config.rope_scaling``: linear, Llama 3.1's), written once for
any array library: the torch zoo passes ``torch.where``, torch-free backends ``numpy.where``.

Only Python scalars meet the arrays here, so each library keeps the table's dtype (fp32) and
its own rounding; the base table ``1 / theta ** (2i / d)`` stays with each backend, computed as
that backend's reference computes it (torch's as HF transformers does, to the last bit).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


def scaled_inverse_frequencies(inv_freq, scaling: dict[str, Any] | None, where: Callable):
    """``inv_freq [head_dim // 2]`` scaled as ``scaling`` says (None or ``"default"``: as is)."""
    scaling = scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_scaled(inv_freq, scaling, where)
    return inv_freq


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
