"""Triton MoE: per-row softmax + iterative top-k; grouped GEMM with one program per (row
tile, output tile) over the experts' row tiles laid end to end (counted on the device, so the
launch needs no host sync), and its weight gradient with one program per (expert, output tile,
input tile) looping over that expert's rows."""

import torch
import triton
import triton.language as tl

from mlx_kernels._grid import next_power_of_2
from mlx_kernels.dispatch import interpreter_on


@triton.jit
def _route(LOGITS, WEIGHTS, EXPERTS, E, TOP_K: tl.constexpr, RENORM: tl.constexpr,
           BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    logits = tl.load(LOGITS + row * E + cols, mask=cols < E, other=float("-inf")).to(tl.float32)
    probs = tl.exp(logits - tl.max(logits, axis=0))
    probs = probs / tl.sum(probs, axis=0)
    slots = tl.arange(0, BLOCK_K)
    top_w = tl.zeros([BLOCK_K], tl.float32)
    top_e = tl.zeros([BLOCK_K], tl.int64)
    remaining = tl.where(cols < E, probs, -1.0)
    for k in range(TOP_K):
        best = tl.max(remaining, axis=0)
        # lowest index among ties, as torch.topk returns it
        index = tl.min(tl.where(remaining == best, cols, BLOCK_E), axis=0)
        top_w = tl.where(slots == k, best, top_w)
        top_e = tl.where(slots == k, index.to(tl.int64), top_e)
        remaining = tl.where(cols == index, -1.0, remaining)
    if RENORM:
        top_w = top_w / tl.sum(tl.where(slots < TOP_K, top_w, 0.0), axis=0)
    tl.store(WEIGHTS + row * TOP_K + slots, top_w, mask=slots < TOP_K)
    tl.store(EXPERTS + row * TOP_K + slots, top_e, mask=slots < TOP_K)


def route(logits, top_k, renormalize):
    n, e = logits.shape
    weights = torch.empty(n, top_k, dtype=torch.float32, device=logits.device)
    experts = torch.empty(n, top_k, dtype=torch.int64, device=logits.device)
    _route[(n,)](logits, weights, experts, e, TOP_K=top_k, RENORM=renormalize,
                 BLOCK_E=next_power_of_2(e), BLOCK_K=next_power_of_2(top_k))
    return weights, experts


BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32


@triton.jit
def _grouped(X, W, OFFSETS, TILE_ENDS, OUT, N, K, E, stride_we, stride_wn, stride_wk,
             IEEE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # program (tile, n): row tile ``tile`` of all experts' tiles laid end to end; its expert is
    # the number of experts whose tiles end at or before it (TILE_ENDS: cumulative tile counts)
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    experts = tl.arange(0, BLOCK_E)
    ends = tl.load(TILE_ENDS + experts, mask=experts < E, other=2**31 - 1)
    expert = tl.sum((ends <= tile).to(tl.int32), axis=0)
    if expert < E:
        first_tile = tl.sum(tl.where(experts == expert - 1, ends, 0), axis=0)
        start = tl.load(OFFSETS + expert) + (tile - first_tile) * BLOCK_M
        end = tl.load(OFFSETS + expert + 1)
        rows = start + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < end) & (ks[None, :] < K), other=0.0)
            w = tl.load(W + expert * stride_we + cols[:, None] * stride_wn + ks[None, :] * stride_wk,
                        mask=(cols[:, None] < N) & (ks[None, :] < K), other=0.0)
            if IEEE:
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        tl.store(OUT + rows[:, None] * N + cols[None, :], acc.to(OUT.dtype.element_ty),
                 mask=(rows[:, None] < end) & (cols[None, :] < N))


@triton.jit
def _grouped_weight_grad(DY, X, OFFSETS, DW, N, K, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # dW[e][n, k] = sum over expert e's rows of dy[row, n] x[row, k]
    expert = tl.program_id(0)
    cols_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    start = tl.load(OFFSETS + expert)
    end = tl.load(OFFSETS + expert + 1)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        dy = tl.load(DY + rows[:, None] * N + cols_n[None, :], mask=(rows[:, None] < end) & (cols_n[None, :] < N), other=0.0)
        x = tl.load(X + rows[:, None] * K + cols_k[None, :], mask=(rows[:, None] < end) & (cols_k[None, :] < K), other=0.0)
        if IEEE:
            acc += tl.dot(tl.trans(dy.to(tl.float32)), x.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(dy), x)
    tl.store(DW + expert * N * K + cols_n[:, None] * K + cols_k[None, :], acc,
             mask=(cols_n[:, None] < N) & (cols_k[None, :] < K))


def _ieee(dtype) -> bool:
    return dtype == torch.float32 or interpreter_on()


def grouped_matmul(x, weights, offsets):
    """``weights [E, N, K]`` may be any strided view (the backward passes a transposed one)."""
    m, k = x.shape
    e, n = weights.shape[0], weights.shape[1]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    # each expert's row tiles, counted on the device: at most cdiv(m, BLOCK_M) + e in all
    tiles = (offsets[1:] - offsets[:-1] + BLOCK_M - 1) // BLOCK_M
    grid = (triton.cdiv(m, BLOCK_M) + e, triton.cdiv(n, BLOCK_N))
    _grouped[grid](x, weights, offsets, tiles.cumsum(0), out, n, k, e, *weights.stride(),
                   IEEE=_ieee(x.dtype), BLOCK_E=next_power_of_2(e),
                   BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out


def grouped_weight_grad(dy, x, offsets, num_experts):
    """``[E, N, K]`` fp32: each expert's ``dy[rows]ᵀ x[rows]`` (zero for an expert with none)."""
    n, k = dy.shape[1], x.shape[1]
    dw = torch.empty(num_experts, n, k, dtype=torch.float32, device=x.device)
    grid = (num_experts, triton.cdiv(n, BLOCK_N), triton.cdiv(k, BLOCK_K))
    _grouped_weight_grad[grid](dy, x.contiguous(), offsets, dw, n, k, IEEE=_ieee(x.dtype),
                               BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return dw
