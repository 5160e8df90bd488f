"""Triton varlen attention: one program per (sequence, block of queries, head); keys in tiles
with an online softmax. Keys come from packed tensors or through a block table.

``IEEE``: the dots run in exact fp32. Always for fp32 inputs (no TF32 rounding), and under the
interpreter, whose numpy has no bf16 matmul; on GPUs bf16/fp16 dots use the tensor cores."""

import torch
import triton
import triton.language as tl

from mlx_kernels._grid import next_power_of_2
from mlx_kernels._paged_attention_triton import softcap_scores
from mlx_kernels.dispatch import interpreter_on

BLOCK_M = 16
BLOCK_N = 16


@triton.jit
def _varlen_fwd(Q, K, V, OUT, CU_Q, CU_K, BLOCK_TABLES, scale, softcap,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_kblock, stride_bt,
                HEADS_PER_KV, HEAD_DIM, WINDOW,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PAGED: tl.constexpr,
                PAGE: tl.constexpr, IEEE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    seq = tl.program_id(0)
    m_block = tl.program_id(1)
    h = tl.program_id(2)
    kv_head = h // HEADS_PER_KV
    q_start = tl.load(CU_Q + seq)
    lq = tl.load(CU_Q + seq + 1) - q_start
    k_start = tl.load(CU_K + seq)
    lk = tl.load(CU_K + seq + 1) - k_start
    if m_block * BLOCK_M < lq:
        rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < lq
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        q_ptrs = Q + (q_start + rows)[:, None] * stride_qt + h * stride_qh + d[None, :]
        q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        if IEEE:
            q = q.to(tl.float32)
        q_pos = rows + (lk - lq)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        hi = lk
        if CAUSAL:
            hi = tl.minimum(lk, (m_block + 1) * BLOCK_M + lk - lq)
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(m_block * BLOCK_M + lk - lq - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
        for n_start in range(lo, hi, BLOCK_N):
            cols = n_start + tl.arange(0, BLOCK_N)
            col_mask = cols < lk
            if PAGED:
                block = tl.load(BLOCK_TABLES + seq * stride_bt + cols // PAGE, mask=col_mask, other=0)
                key_rows = block.to(tl.int64) * stride_kblock + (cols % PAGE) * stride_kt
            else:
                key_rows = (k_start + cols).to(tl.int64) * stride_kt
            kv_ptrs = key_rows[:, None] + kv_head * stride_kh + d[None, :]
            kv_mask = col_mask[:, None] & d_mask[None, :]
            k = tl.load(K + kv_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(V + kv_ptrs, mask=kv_mask, other=0.0)
            if IEEE:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k)) * scale
            if HAS_SOFTCAP:
                s = softcap_scores(s, softcap)
            mask = row_mask[:, None] & col_mask[None, :]
            if CAUSAL:
                mask = mask & (cols[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                mask = mask & (q_pos[:, None] - cols[None, :] < WINDOW)
            s = tl.where(mask, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # padding rows have no keys
        out_ptrs = OUT + (q_start + rows)[:, None] * stride_qt + h * stride_qh + d[None, :]
        tl.store(out_ptrs, out.to(OUT.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, causal, sliding_window, scale,
            block_tables, softcap=None):
    q = q.contiguous()
    k, v = k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    heads, dim = q.shape[1], q.shape[2]
    paged = block_tables is not None
    tables = block_tables.contiguous() if paged else cu_seqlens_q  # placeholder pointer when unpaged
    num_seqs = cu_seqlens_q.shape[0] - 1
    grid = (num_seqs, triton.cdiv(max_seqlen_q, BLOCK_M), heads)
    _varlen_fwd[grid](
        q, k, v, out, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), tables, scale,
        softcap or 0.0,
        q.stride(0), q.stride(1), k.stride(-3), k.stride(-2), k.stride(0) if paged else 0,
        tables.stride(0) if paged else 0, heads // k.shape[-2], dim, sliding_window or 0,
        CAUSAL=causal, HAS_WINDOW=sliding_window is not None, PAGED=paged,
        PAGE=k.shape[1] if paged else 1, IEEE=q.dtype == torch.float32 or interpreter_on(),
        HAS_SOFTCAP=softcap is not None,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=max(next_power_of_2(dim), 16),
    )
    return out
