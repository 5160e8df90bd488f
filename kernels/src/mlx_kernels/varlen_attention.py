"""Causal attention over packed variable-length sequences (prefill), flash-attention style.

Queries of all sequences are packed into ``q [total_q, heads, head_dim]`` with offsets
``cu_seqlens_q [S + 1]``. Keys/values are either packed the same way (``k, v [total_k, kv_heads,
head_dim]`` with ``cu_seqlens_k``) or, with ``block_tables [S, max_blocks]``, read from a paged
cache ``[num_blocks, block_size, kv_heads, head_dim]`` where ``cu_seqlens_k`` gives each
sequence's total length (cached prefix + new tokens: prefix caching and chunked prefill).
A sequence with more keys than queries has its queries at the END (bottom-right causal
alignment): query ``i`` of ``Lq`` sits at key position ``Lk - Lq + i``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mlx_kernels.dispatch import backend_for
from mlx_kernels.paged_attention import gather_paged


def _bottom_right_mask(lq, lk, causal, sliding_window, device) -> torch.Tensor | None:
    """``[lq, lk]`` bool, True where query ``i`` (at key position ``lk - lq + i``) may look;
    None when it may look everywhere. Few ops: on CPU each costs more than its arithmetic."""
    q_pos = torch.arange(lk - lq, lk, device=device)[:, None]
    k_pos = torch.arange(lk, device=device)
    mask = k_pos <= q_pos if causal else None
    if sliding_window is not None:
        inside = q_pos - k_pos < sliding_window
        mask = inside if mask is None else mask.logical_and_(inside)
    return mask


def varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=True,
                               sliding_window=None, scale=None, block_tables=None):
    out = torch.empty_like(q)
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cu_q) - 1):
        lq, lk = cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i]
        if lq == 0:
            continue
        if block_tables is None:
            keys, values = k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]
        else:
            keys, values = gather_paged(k, block_tables[i], lk), gather_paged(v, block_tables[i], lk)
        mask = None  # plain causal over the whole sequence: SDPA's own mask skips masked tiles
        if (causal and lq != lk) or sliding_window is not None:
            mask = _bottom_right_mask(lq, lk, causal, sliding_window, q.device)
        o = F.scaled_dot_product_attention(
            q[cu_q[i]:cu_q[i + 1]].transpose(0, 1)[None].to(keys.dtype), keys.transpose(0, 1)[None],
            values.transpose(0, 1)[None], attn_mask=mask, scale=scale,
            is_causal=causal and mask is None, enable_gqa=q.shape[1] != keys.shape[1])
        out[cu_q[i]:cu_q[i + 1]] = o[0].transpose(0, 1).to(q.dtype)
    return out


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, *, max_seqlen_q: int | None = None,
                     causal: bool = True, sliding_window: int | None = None,
                     scale: float | None = None,
                     block_tables: torch.Tensor | None = None) -> torch.Tensor:
    """Packed attention; see the module docstring for the layouts. Returns ``[total_q, heads,
    head_dim]`` in q's dtype. GQA when ``heads`` is a multiple of ``kv_heads``; ``scale``
    defaults to ``1/sqrt(head_dim)``. Inference only (no gradient)."""
    if q.dim() != 3 or k.shape != v.shape or q.shape[1] % k.shape[-2] or q.shape[2] != k.shape[-1]:
        raise ValueError(f"varlen_attention: q [total_q, heads, D] and k/v [..., kv_heads, D] with "
                         f"heads a multiple of kv_heads; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.dim() != 1:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must both be [num_seqs + 1]")
    if block_tables is not None and (k.dim() != 4 or k.shape[1] & (k.shape[1] - 1)):
        raise ValueError("with block_tables, k and v are paged caches [num_blocks, block_size, "
                         "kv_heads, head_dim] with a power-of-two block_size")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if backend_for(q.device) == "triton":
        from mlx_kernels import _varlen_attention_triton

        if max_seqlen_q is None:
            max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        return _varlen_attention_triton.forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                causal, sliding_window, scale, block_tables)
    return varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal,
                                      sliding_window=sliding_window, scale=scale,
                                      block_tables=block_tables)
