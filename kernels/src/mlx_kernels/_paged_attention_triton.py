"""Triton paged decode: one program per (sequence, query head), online softmax over the blocks."""

import torch
import triton
import triton.language as tl

from mlx_kernels._grid import next_power_of_2


@triton.jit
def softcap_scores(s, cap):
    """Gemma 2's ``cap * tanh(s / cap)`` in fp32. tanh from ``e = exp(-2|x|)`` in (0, 1], which
    never overflows: ``sign(x) (1 - e) / (1 + e)``. libdevice's tanh is an extern call, which the
    interpreter (how these kernels are tested without a GPU) cannot run, and ``tl`` has no tanh."""
    t = s / cap
    e = tl.exp(-2.0 * tl.abs(t))
    return tl.where(t >= 0, cap, -cap) * (1.0 - e) / (1.0 + e)


@triton.jit
def _paged_decode(Q, K_CACHE, V_CACHE, BLOCK_TABLES, CONTEXT_LENS, OUT, scale, softcap,
                  stride_qb, stride_qh, stride_bt, stride_cb, stride_cs, stride_ch,
                  HEADS_PER_KV, HEAD_DIM, WINDOW,
                  BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    kv_head = h // HEADS_PER_KV
    context = tl.load(CONTEXT_LENS + b)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + d, mask=d_mask, other=0.0).to(tl.float32) * scale
    start = 0
    if HAS_WINDOW:
        start = tl.maximum(context - WINDOW, 0)
    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    offs = tl.arange(0, BLOCK_SIZE)
    for blk in range(start // BLOCK_SIZE, tl.cdiv(context, BLOCK_SIZE)):
        physical = tl.load(BLOCK_TABLES + b * stride_bt + blk).to(tl.int64)
        pos = blk * BLOCK_SIZE + offs
        valid = (pos < context) & (pos >= start)
        rows = physical * stride_cb + offs[:, None] * stride_cs + kv_head * stride_ch + d[None, :]
        tile_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(K_CACHE + rows, mask=tile_mask, other=0.0).to(tl.float32)
        v = tl.load(V_CACHE + rows, mask=tile_mask, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1)  # q carries the scale
        if HAS_SOFTCAP:
            s = softcap_scores(s, softcap)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    out = acc / l_i
    tl.store(OUT + b * stride_qb + h * stride_qh + d, out.to(OUT.dtype.element_ty), mask=d_mask)


def decode(query, key_cache, value_cache, block_tables, context_lens, scale, sliding_window,
           softcap=None):
    b, heads, dim = query.shape
    query = query.contiguous()
    out = torch.empty_like(query)
    _paged_decode[(b, heads)](
        query, key_cache, value_cache, block_tables.contiguous(), context_lens.contiguous(), out,
        scale, softcap or 0.0, query.stride(0), query.stride(1), block_tables.stride(0),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        heads // key_cache.shape[2], dim, sliding_window or 0,
        BLOCK_SIZE=key_cache.shape[1], BLOCK_D=next_power_of_2(dim),
        HAS_WINDOW=sliding_window is not None, HAS_SOFTCAP=softcap is not None,
    )
    return out
