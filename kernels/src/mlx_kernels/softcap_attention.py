"""Scaled dot-product attention with optional logit soft-capping (Gemma 2): the scores become
``softcap * tanh(scores / softcap)`` before the mask and the softmax, as HF's eager attention
computes them. Without a cap it is ``F.scaled_dot_product_attention`` itself; with one it is
written out in fp32 (SDPA takes no score transform): the zoo's attention with a cap, and the
reference of paged decode's and varlen prefill's kernels, which cap their scores themselves.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def softcap_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                      attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                      scale: float | None = None, softcap: float | None = None,
                      enable_gqa: bool = False) -> torch.Tensor:
    """``q [..., Hq, T, D]``, ``k, v [..., Hkv, S, D]``, ``attn_mask`` bool (True: may attend),
    broadcastable to ``[..., Hq, T, S]``; SDPA's arguments plus ``softcap``."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                              scale=scale, enable_gqa=enable_gqa)
    if enable_gqa and q.shape[-3] != k.shape[-3]:
        groups = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        t, s = scores.shape[-2], scores.shape[-1]
        causal = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
        attn_mask = causal if attn_mask is None else attn_mask & causal
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v.float()).to(q.dtype)
