"""Triton LoRA kernels.

- ``_lora_fwd``: one program per (row tile, output tile); one pass over ``in`` accumulates both
  ``x Wᵀ`` and ``x Aᵀ`` (rank padded to a power of two), then adds ``s · (x Aᵀ) Bᵀ``.
- ``_shrink`` / ``_expand``: per token row, ``v = x A[id]ᵀ`` then ``y += s[id] · v B[id]ᵀ``.
"""

import torch
import triton
import triton.language as tl

from mlx_kernels._grid import next_power_of_2
from mlx_kernels.dispatch import interpreter_on

BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32


@triton.jit
def _lora_fwd(X, W, A, B, BIAS, Y, XA, M, N, K, R, scaling,
              HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    xa = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        w = tl.load(W + cols[:, None] * K + ks[None, :], mask=(cols[:, None] < N) & (ks[None, :] < K), other=0.0)
        a = tl.load(A + ranks[:, None] * K + ks[None, :], mask=(ranks[:, None] < R) & (ks[None, :] < K), other=0.0)
        if IEEE:
            x, w, a = x.to(tl.float32), w.to(tl.float32), a.to(tl.float32)
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            xa += tl.dot(x, tl.trans(a), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
            xa += tl.dot(x, tl.trans(a))
    b = tl.load(B + cols[:, None] * R + ranks[None, :], mask=(cols[:, None] < N) & (ranks[None, :] < R), other=0.0)
    if IEEE:
        acc += scaling * tl.dot(xa, tl.trans(b.to(tl.float32)), input_precision="ieee")
    else:
        acc += scaling * tl.dot(xa.to(b.dtype), tl.trans(b))
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * N + cols[None, :], acc.to(Y.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))
    if pid_n == 0:  # saved for the backward of lora_b
        tl.store(XA + rows[:, None] * R + ranks[None, :], xa, mask=(rows[:, None] < M) & (ranks[None, :] < R))


def forward(x2d, weight, lora_a, lora_b, scaling, bias):
    m, k = x2d.shape
    n, r = weight.shape[0], lora_a.shape[0]
    y = torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)
    xa = torch.empty(m, r, dtype=torch.float32, device=x2d.device)
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    _lora_fwd[grid](x2d, weight, lora_a, lora_b, x2d if bias is None else bias, y, xa, m, n, k, r,
                    scaling, HAS_BIAS=bias is not None,
                    IEEE=x2d.dtype == torch.float32 or interpreter_on(),
                    BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                    BLOCK_R=max(next_power_of_2(r), 16))
    return y, xa


@triton.jit
def _shrink(X, A, IDS, V, K, R, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    row = tl.program_id(0)
    adapter = tl.load(IDS + row).to(tl.int64)
    if adapter >= 0:
        ranks = tl.arange(0, BLOCK_R)
        acc = tl.zeros([BLOCK_R], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + row * K + ks, mask=ks < K, other=0.0).to(tl.float32)
            a = tl.load(A + adapter * R * K + ranks[:, None] * K + ks[None, :],
                        mask=(ranks[:, None] < R) & (ks[None, :] < K), other=0.0).to(tl.float32)
            acc += tl.sum(a * x[None, :], axis=1)
        tl.store(V + row * R + ranks, acc, mask=ranks < R)


@triton.jit
def _expand(V, B, IDS, SCALINGS, Y, N, R, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    adapter = tl.load(IDS + row).to(tl.int64)
    if adapter >= 0:
        ranks = tl.arange(0, BLOCK_R)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        v = tl.load(V + row * R + ranks, mask=ranks < R, other=0.0)
        b = tl.load(B + adapter * N * R + cols[:, None] * R + ranks[None, :],
                    mask=(cols[:, None] < N) & (ranks[None, :] < R), other=0.0).to(tl.float32)
        s = tl.load(SCALINGS + adapter)
        y = tl.load(Y + row * N + cols, mask=cols < N, other=0.0).to(tl.float32)
        y += s * tl.sum(b * v[None, :], axis=1)
        tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=cols < N)


def add_multi(x, lora_a, lora_b, adapter_ids, scalings, y) -> None:
    """``y[i] += s[id_i] · (x[i] A[id_i]ᵀ) B[id_i]ᵀ`` in place, for rows with ``id_i >= 0``."""
    m, k = x.shape
    r, n = lora_a.shape[1], y.shape[1]
    block_r = next_power_of_2(r)
    v = torch.empty(m, r, dtype=torch.float32, device=x.device)
    _shrink[(m,)](x, lora_a, adapter_ids, v, k, r, BLOCK_K=64, BLOCK_R=block_r)
    _expand[(m, triton.cdiv(n, 64))](v, lora_b, adapter_ids, scalings, y, n, r, BLOCK_N=64,
                                     BLOCK_R=block_r)
