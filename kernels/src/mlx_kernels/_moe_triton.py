"""Triton MoE: per-row softmax + iterative top-k; grouped GEMM with one program per
(expert, row tile, output tile) that exits early past its expert's rows."""

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
def _grouped(X, W, OFFSETS, OUT, N, K, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    expert = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    start = tl.load(OFFSETS + expert)
    end = tl.load(OFFSETS + expert + 1)
    if start + pid_m * BLOCK_M < end:
        rows = start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < end) & (ks[None, :] < K), other=0.0)
            w = tl.load(W + expert * N * K + cols[:, None] * K + ks[None, :],
                        mask=(cols[:, None] < N) & (ks[None, :] < K), other=0.0)
            if IEEE:
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        tl.store(OUT + rows[:, None] * N + cols[None, :], acc.to(OUT.dtype.element_ty),
                 mask=(rows[:, None] < end) & (cols[None, :] < N))


def grouped_matmul(x, weights, offsets):
    m, k = x.shape
    e, n = weights.shape[0], weights.shape[1]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    most = int((offsets[1:] - offsets[:-1]).max()) if m else 0
    grid = (e, max(triton.cdiv(most, BLOCK_M), 1), triton.cdiv(n, BLOCK_N))
    _grouped[grid](x, weights, offsets, out, n, k,
                   IEEE=x.dtype == torch.float32 or interpreter_on(),
                   BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out
