"""Causal attention over packed variable-length sequences (prefill), flash-attention style.

Queries of all sequences are packed into ``q [total_q, heads, head_dim]`` with offsets
``cu_seqlens_q [S + 1]``. Keys/values are either packed the same way (``k, v [total_k, kv_heads,
head_dim]`` with ``cu_seqlens_k``) or, with ``block_tables [S, max_blocks]``, read from a paged
cache ``[num_blocks, block_size, kv_heads, head_dim]`` where ``cu_seqlens_k`` gives each
sequence's total length (cached prefix + new tokens: prefix caching and chunked prefill).
A sequence with more keys than queries has its queries at the END (bottom-right causal
alignment): query ``i`` of ``Lq`` sits at key position ``Lk - Lq + i``.

On CPU with an fp32 query, causal paged calls run the native paged attention of
``_cpu_kernels.c`` where it is the faster (``runs_native``): with its AVX2 register tiles, calls
whose sequences have at most ``NATIVE_MAX_QUERIES`` queries or ``NATIVE_MAX_KEYS`` keys each
(prefills of up to 512 tokens, chunked prefill, a prompt continued after a cached prefix,
speculative verification); without them, two or more sequences of at most
``NATIVE_MAX_QUERIES`` queries. Other calls run the reference (or Triton on CUDA).
"""

from __future__ import annotations

import math

import torch

from mlx_kernels import paged_attention
from mlx_kernels.dispatch import backend_for
from mlx_kernels.paged_attention import gather_paged
from mlx_kernels.softcap_attention import softcap_attention

# Where the native kernel runs (``runs_native``). Its register tiles (AVX2, head_dim a multiple of
# 8) score each query over the keys it sees, so their time grows with queries x keys; SDPA's
# blocked loop is faster for long prefills with long keys. Measured on the 2-core CI machine (AMD
# EPYC, AVX2; 9 heads, 3 kv heads, head_dim 64, block 16; ms, tiles / reference): whole prefills
# of 13 prompts of 32-256 tokens 8.4 / 11.7, 4 x 512 21.0 / 28.4, 1 x 256 1.2 / 1.5, 1 x 2048
# 87 / 64; 16 sequences of 256 cached + 64 queries 14.8 / 16.1, of 1024 cached + 64 53.9 / 47.5;
# 1-16 sequences of 2048 cached + 4 or 16 queries 0.8-34 / 1.2-42; 1 sequence of 1792 cached +
# 256 20.1 / 13.4. So the tiles run calls whose sequences all have at most NATIVE_MAX_QUERIES
# queries or at most NATIVE_MAX_KEYS keys.
NATIVE_MAX_KEYS = 512
# Without the tiles, the general loop (reading each cached row once for all heads and queries)
# runs calls of at least two sequences of at most NATIVE_MAX_QUERIES queries. Measured on the 2-core CI
# machine (9 heads, 3 kv heads, head_dim 64, block 16; median ms, reference -> native): 48
# sequences with 32-300 cached tokens and 1/2/4/8/16/32/48 queries each: 10.8 -> 2.3, 11.1 -> 2.5,
# 13.5 -> 3.4, 14.1 -> 5.1, 16.0 -> 8.3, 20.9 -> 16.3, 26.3 -> 26.2; 4 sequences (100-1000
# cached) with 4/16/32: 1.5 -> 0.8, 2.3 -> 2.1, 3.5 -> 4.4; 2 sequences (1000-2000 cached) with
# 4/16/32: 4.0 -> 1.7, 5.1 -> 5.3, 6.9 -> 9.0. The native loop runs a sequence per thread where
# SDPA spreads one over all threads: a lone sequence (2000 cached) with 4/16 queries is 1.4 ->
# 1.5, 2.0 -> 2.4, so it stays on the reference.
NATIVE_MAX_QUERIES = 16


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
                               sliding_window=None, scale=None, block_tables=None, softcap=None):
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
        # a half-precision cache under an fp32 q: attend in fp32, as the native kernel does
        dtype = torch.promote_types(q.dtype, keys.dtype)
        o = softcap_attention(
            q[cu_q[i]:cu_q[i + 1]].transpose(0, 1)[None].to(dtype),
            keys.transpose(0, 1)[None].to(dtype), values.transpose(0, 1)[None].to(dtype),
            attn_mask=mask, scale=scale, softcap=softcap,
            is_causal=causal and mask is None, enable_gqa=q.shape[1] != keys.shape[1])
        out[cu_q[i]:cu_q[i + 1]] = o[0].transpose(0, 1).to(q.dtype)
    return out


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, *, max_seqlen_q: int | None = None,
                     causal: bool = True, sliding_window: int | None = None,
                     scale: float | None = None,
                     block_tables: torch.Tensor | None = None,
                     softcap: float | None = None) -> torch.Tensor:
    """Packed attention; see the module docstring for the layouts. Returns ``[total_q, heads,
    head_dim]`` in q's dtype. GQA when ``heads`` is a multiple of ``kv_heads``; ``scale``
    defaults to ``1/sqrt(head_dim)``; ``softcap`` (Gemma 2, > 0) makes the scaled scores
    ``softcap * tanh(score / softcap)`` before the mask and softmax. Inference only (no
    gradient)."""
    if q.dim() != 3 or k.shape != v.shape or q.shape[1] % k.shape[-2] or q.shape[2] != k.shape[-1]:
        raise ValueError(f"varlen_attention: q [total_q, heads, D] and k/v [..., kv_heads, D] with "
                         f"heads a multiple of kv_heads; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.dim() != 1:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must both be [num_seqs + 1]")
    if block_tables is not None and (k.dim() != 4 or k.shape[1] & (k.shape[1] - 1)):
        raise ValueError("with block_tables, k and v are paged caches [num_blocks, block_size, "
                         "kv_heads, head_dim] with a power-of-two block_size")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 (or None), got {softcap}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if backend_for(q.device) == "triton":
        from mlx_kernels import _varlen_attention_triton

        if max_seqlen_q is None:
            max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        return _varlen_attention_triton.forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                causal, sliding_window, scale, block_tables,
                                                softcap)
    if block_tables is not None and causal and len(cu_seqlens_q) > 1:
        lq = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
        lk = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
        if runs_native(q, k, v, len(lq), int(lq.max()), int(lk.max())):
            return _paged_native(q, k, v, cu_seqlens_q, cu_seqlens_k, lq, sliding_window, scale,
                                 block_tables, softcap)
    return varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal,
                                      sliding_window=sliding_window, scale=scale,
                                      block_tables=block_tables, softcap=softcap)


def runs_native(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                num_seqs: int, max_queries: int, max_keys: int) -> bool:
    """Whether a causal call with ``block_tables`` over these caches runs the native kernel:
    ``num_seqs`` sequences of at most ``max_queries`` queries and ``max_keys`` keys each. A
    caller holding prefills' keys both packed and in the cache (``mlx_core``'s paged attention)
    asks first, so that it hands the cache to the native kernel and the packed keys to SDPA."""
    if not paged_attention.native_cpu_over_cache(q, key_cache, value_cache):
        return False
    if paged_attention.native_tiles(q.shape[-1]):
        return max_queries <= NATIVE_MAX_QUERIES or max_keys <= NATIVE_MAX_KEYS
    return num_seqs > 1 and max_queries <= NATIVE_MAX_QUERIES


def _paged_native(q, key_cache, value_cache, cu_seqlens_q, cu_seqlens_k, lq, sliding_window, scale,
                  block_tables, softcap):
    """A few queries per sequence over its paged keys/values: the native loop reads each cached
    row once for all heads and queries (the reference copies the sequence's blocks out and runs
    SDPA on it, one sequence at a time)."""
    lk = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    capacity = block_tables.shape[1] * key_cache.shape[1]
    if (block_tables.shape[0] < len(lq) or int(cu_seqlens_q[0]) < 0
            or int(cu_seqlens_q[-1]) > q.shape[0]
            or bool(((lq < 0) | (lq > lk) | (lk > capacity)).any())):
        raise ValueError(f"varlen_attention with block_tables: each sequence needs 0 <= queries <= "
                         f"keys <= max_blocks * block_size = {capacity} and a block_tables row, "
                         f"queries within q; got cu_seqlens_q {cu_seqlens_q.tolist()}, "
                         f"cu_seqlens_k {cu_seqlens_k.tolist()}, block_tables "
                         f"{tuple(block_tables.shape)}")
    as_int32 = [t.to(torch.int32).contiguous() for t in (block_tables, lk, cu_seqlens_q)]
    return paged_attention.native_paged_attention(q, key_cache, value_cache, *as_int32, scale,
                                                  sliding_window, softcap)
