"""The sampling filters, once for ``mlx_core.generate`` and the serving engine's sampler:
temperature, then top-k, then top-p (nucleus), then min-p, as HF's logits warpers apply them
and with their arithmetic (tests/core/test_sampling.py compares every filter with HF's), each
row with its own settings. The options' checks are torch-free: ``mlx_core.sampling_options``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _per_row(values, rows: int, device, dtype) -> torch.Tensor:
    if isinstance(values, (int, float)):
        values = [values] * rows
    return torch.as_tensor(list(values), device=device, dtype=dtype)


def filter_logits(logits: torch.Tensor, temperature: float | Sequence[float] = 1.0,
                  top_k: int | Sequence[int] = 0, top_p: float | Sequence[float] = 1.0,
                  min_p: float | Sequence[float] = 0.0) -> torch.Tensor:
    """``logits [B, V]`` divided by ``temperature`` (> 0), with the tokens each filter drops set
    to -inf; each setting one value for all rows or one per row. ``top_k <= 0``, ``top_p = 1``
    and ``min_p = 0`` leave a row unfiltered; the most likely token is always kept."""
    rows, vocab = logits.shape
    device = logits.device
    logits = logits.float() / _per_row(temperature, rows, device, torch.float32)[:, None]
    ks = _per_row(top_k, rows, device, torch.long)
    if bool(((ks > 0) & (ks < vocab)).any()):  # HF's TopKLogitsWarper: below the k-th value
        ordered = logits.sort(dim=-1, descending=True).values
        kth = ordered.gather(1, (ks.clamp(1, vocab) - 1)[:, None])
        kth = kth.masked_fill(((ks <= 0) | (ks >= vocab))[:, None], float("-inf"))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    ps = _per_row(top_p, rows, device, torch.float64)
    if bool((ps < 1).any()):  # HF's TopPLogitsWarper: ascending, drop what sums to <= 1 - p
        ascending, order = logits.sort(dim=-1)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        # 1 - p in double, then rounded, as HF's Python float is: the same cut at the boundary
        drop = (cumulative <= (1 - ps).float()[:, None]) & (ps < 1)[:, None]
        drop[:, -1] = False  # the most likely token
        logits = logits.scatter(1, order, ascending.masked_fill(drop, float("-inf")))
    min_ps = _per_row(min_p, rows, device, torch.float32)
    if bool((min_ps > 0).any()):  # HF's MinPLogitsWarper: below min_p x the top probability
        probs = logits.softmax(dim=-1)
        threshold = min_ps[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits
