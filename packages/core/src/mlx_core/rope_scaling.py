"""RoPE's frequency scaling (``config.rope_scaling``: linear, dynamic NTK, YaRN, LongRoPE,
Llama 3.1's), written once for any array library: the torch zoo passes ``torch.where`` (and
``torch.arange``, ``torch.tensor``), torch-free backends numpy's or jax.numpy's.

Only Python scalars meet the arrays here, so each library keeps the table's dtype (fp32) and
its own rounding; the base table ``1 / theta ** (2i / d)`` stays with each backend, computed as
that backend's reference computes it (torch's as HF transformers does, to the last bit).

Two types depend on the sequence's length, as HF transformers (5.x) runs them: each forward
picks its table by ``seq_len``, the largest position it computes plus one (over the batch).
Dynamic NTK grows the RoPE base once ``seq_len`` passes ``max_position_embeddings``; LongRoPE
divides the frequencies by ``short_factor`` up to ``original_max_position_embeddings`` and by
``long_factor`` past it, and multiplies cos/sin by its attention factor at every length. Keys
already cached keep the table they were computed with (HF's cached generation does the same),
except where a family's generation recomputes them (``recompute_length``: Phi-3).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

LENGTH_DEPENDENT = ("dynamic", "longrope")  # the types whose table depends on seq_len


def scaled_inverse_frequencies(inv_freq, scaling: dict[str, Any] | None, where: Callable, *,
                               arange: Callable | None = None, theta: float | None = None,
                               max_position_embeddings: int | None = None,
                               array: Callable | None = None):
    """``inv_freq [head_dim // 2]`` scaled as ``scaling`` says (None or ``"default"``: as is).
    YaRN and LongRoPE also need ``arange(n)`` (fp32 0..n-1 in the array library) and the RoPE
    base ``theta``; YaRN the model's ``max_position_embeddings``; LongRoPE ``array(list)`` (an
    fp32 array). For the length-dependent types this is the table of short sequences (dynamic:
    ``inv_freq`` as is; LongRoPE: the short factors'), what HF builds at load;
    ``inverse_frequencies_at`` gives the one for a length."""
    scaling = scaling or {}
    rope_type = _rope_type(scaling)
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_scaled(inv_freq, scaling, where)
    if rope_type == "yarn":
        return _yarn_scaled(inv_freq, scaling, where, arange, theta, max_position_embeddings)
    if rope_type == "longrope":
        return longrope_inverse_frequencies(scaling, "short_factor", arange, array, theta)
    return inv_freq


def is_length_dependent(scaling: dict[str, Any] | None) -> bool:
    """Whether the table depends on the sequence's length (dynamic NTK, LongRoPE)."""
    return _rope_type(scaling or {}) in LENGTH_DEPENDENT


def longrope_inverse_frequencies(scaling: dict[str, Any], which: str, arange: Callable,
                                 array: Callable, theta: float):
    """LongRoPE's table for ``which`` (``"short_factor"`` or ``"long_factor"``): the base
    frequencies each divided by its factor, ``1 / (factor_i * theta ** (2i / d))`` as HF
    computes it."""
    if arange is None or array is None or theta is None:
        raise ValueError("LongRoPE scaling needs arange, array and theta")
    factors = scaling[which]
    dim = 2 * len(factors)
    return 1.0 / (array(factors) * theta ** (arange(dim // 2) * 2 / dim))


def inverse_frequencies_at(inv_freq, seq_len, scaling: dict[str, Any] | None, where: Callable, *,
                           long_inv_freq=None, arange: Callable | None = None,
                           theta: float | None = None, max_position_embeddings: int | None = None):
    """The table a forward uses whose ``seq_len`` (an integer array ``[..., 1]``: the largest
    position plus one, per batch or per token) it is: ``[..., head_dim // 2]``. ``inv_freq``:
    ``scaled_inverse_frequencies``' table; LongRoPE also takes ``long_inv_freq`` (the long
    factors'), dynamic NTK ``arange``, ``theta`` and ``max_position_embeddings``. Any other type:
    ``inv_freq`` as is. Array operations only, no host sync (a compiled decode step traces it)."""
    scaling = scaling or {}
    rope_type = _rope_type(scaling)
    if rope_type == "longrope":
        original = original_max_position_embeddings(scaling, max_position_embeddings)
        return where(seq_len > original, long_inv_freq, inv_freq)
    if rope_type == "dynamic":
        if arange is None or theta is None or max_position_embeddings is None:
            raise ValueError("dynamic NTK RoPE scaling needs arange, theta and "
                             "max_position_embeddings")
        grown = _dynamic_ntk(seq_len, scaling, where, arange, theta, max_position_embeddings,
                             2 * inv_freq.shape[-1])
        return where(seq_len > max_position_embeddings, grown, inv_freq)
    return inv_freq


def _dynamic_ntk(seq_len, scaling, where, arange, theta, max_position_embeddings, dim):
    """Dynamic NTK: the base grown to ``theta * (factor * len / max - (factor - 1)) **
    (d / (d - 2))`` for ``len = max(seq_len, max_position_embeddings)``, in the array
    library's fp32 as HF does (its ``seq_len`` is a tensor there too)."""
    length = where(seq_len > max_position_embeddings, seq_len, max_position_embeddings)
    factor = scaling["factor"]
    base = theta * ((factor * length / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (arange(dim // 2) * 2 / dim))


def original_max_position_embeddings(scaling: dict[str, Any] | None,
                                     max_position_embeddings: int | None) -> int | None:
    """The pre-training context the scaling extends (the model's own when not given)."""
    return (scaling or {}).get("original_max_position_embeddings") or max_position_embeddings


def table_key(scaling: dict[str, Any] | None, max_position_embeddings: int,
              length: int) -> int | None:
    """What tells apart the tables of forwards over ``length`` tokens: two lengths with equal
    keys use one table. Dynamic NTK: the length past ``max_position_embeddings`` (one table
    up to it); LongRoPE: 1 past ``original_max_position_embeddings``, else 0; any other type:
    None (one table for every length)."""
    rope_type = _rope_type(scaling or {})
    if rope_type == "dynamic":
        return max(length, max_position_embeddings)
    if rope_type == "longrope":
        return int(length > original_max_position_embeddings(scaling, max_position_embeddings))
    return None


def recompute_length(model_type: str, scaling: dict[str, Any] | None,
                     max_position_embeddings: int) -> int | None:
    """Where generation drops the KV cache and computes every token again: HF's Phi-3
    (``Phi3ForCausalLM.prepare_inputs_for_generation``), once the cache holds
    ``original_max_position_embeddings`` tokens and the next one passes it, so that with
    LongRoPE every key then has the long factors. None: never (every other family and type:
    cached keys keep the table they were computed with)."""
    if model_type == "phi3" and _rope_type(scaling or {}) == "longrope":
        return original_max_position_embeddings(scaling, max_position_embeddings)
    return None


def rope_scaling_problems(scaling: dict[str, Any] | None, rotary_dim: int) -> list[str]:
    """What is wrong with the fields of a dynamic or LongRoPE ``scaling`` for heads rotating
    ``rotary_dim`` dimensions, each naming its field (empty: nothing; other types: not checked
    here)."""
    scaling = scaling or {}
    rope_type = _rope_type(scaling)
    problems = []

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if rope_type == "dynamic" and not (number(scaling.get("factor"))
                                       and scaling["factor"] >= 1):
        problems.append(f"dynamic RoPE scaling needs a number factor >= 1 "
                        f"(got factor={scaling.get('factor')!r})")
    if rope_type == "longrope":
        for name in ("short_factor", "long_factor"):
            factors = scaling.get(name)
            if not (isinstance(factors, (list, tuple)) and all(number(f) for f in factors)):
                problems.append(f"longrope RoPE scaling needs {name}: a list of "
                                f"{rotary_dim // 2} numbers (got {factors!r})")
            elif len(factors) != rotary_dim // 2:
                problems.append(f"longrope {name} has {len(factors)} numbers; heads of "
                                f"{rotary_dim} rotary dimensions need {rotary_dim // 2}")
        original = scaling.get("original_max_position_embeddings")
        if not (isinstance(original, int) and not isinstance(original, bool) and original > 0):
            problems.append(f"longrope RoPE scaling needs original_max_position_embeddings: the "
                            f"pre-training context, a positive integer (got {original!r})")
        for name in ("factor", "attention_factor"):
            value = scaling.get(name)
            if value is not None and not (number(value) and value > 0):
                problems.append(f"longrope {name} must be a positive number (got {value!r})")
    return problems


def rope_attention_factor(scaling: dict[str, Any] | None,
                          max_position_embeddings: int | None = None) -> float:
    """What cos and sin are multiplied by: 1, YaRN's ``attention_factor`` (given, or from
    ``factor``, ``mscale`` and ``mscale_all_dim``, as HF transformers infers it), or
    LongRoPE's (given, or ``sqrt(1 + ln(factor) / ln(original))`` with ``factor`` given or
    ``max_position_embeddings / original``; the same at every length)."""
    scaling = scaling or {}
    if _rope_type(scaling) == "longrope":
        return _longrope_attention_factor(scaling, max_position_embeddings)
    if _rope_type(scaling) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = _yarn_factor(scaling, max_position_embeddings)
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
    return _yarn_mscale(factor)


def _longrope_attention_factor(scaling: dict[str, Any], max_position_embeddings: int | None) -> float:
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = original_max_position_embeddings(scaling, max_position_embeddings)
    factor = scaling.get("factor")
    if factor is None:
        factor = max_position_embeddings / original
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original))


def rope_type(scaling: dict[str, Any] | None) -> str:
    """``scaling``'s type (``rope_type``, or the older ``type``); ``"default"`` for None."""
    return _rope_type(scaling or {})


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
