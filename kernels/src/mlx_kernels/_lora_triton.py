"""Triton LoRA kernels.

- ``_lora_fwd``: one program per (row tile, output tile); one pass over ``in`` accumulates both
  ``x Wᵀ`` and ``x Aᵀ`` (rank padded to a power of two), then adds ``s · (x Aᵀ) Bᵀ``.
- ``_lora_bwd_dx``: the mirror image for the input gradient: one program per (row tile, ``in``
  tile); one pass over ``out`` accumulates ``dy W`` and ``dy B``, then adds ``s · (dy B) A``.
  ``dy B`` is kept (fp32) for ``dA``.
- ``_lora_bwd_dw``: the weight gradients, one pass over the rows: ``dW = dyᵀ x`` per (out, in)
  tile, with ``dB = s · dyᵀ (x Aᵀ)`` and ``dbias`` riding on the first ``in`` tile's ``dy`` loads
  and ``dA = s · (dy B)ᵀ x`` on the first ``out`` tile's ``x`` loads.
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
def _lora_bwd_dx(DY, W, A, B, DX, DYB, M, N, K, R, scaling,
                 HAS_DX: tl.constexpr, HAS_DYB: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    dyb = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(DY + rows[:, None] * N + ns[None, :], mask=(rows[:, None] < M) & (ns[None, :] < N), other=0.0)
        # every program recomputes its rows' dy B (r columns: cheap next to dy W), as the forward
        # does x Aᵀ, so the low-rank term needs no second pass over dy
        b = tl.load(B + ns[:, None] * R + ranks[None, :], mask=(ns[:, None] < N) & (ranks[None, :] < R), other=0.0)
        if IEEE:
            dy = dy.to(tl.float32)
            dyb += tl.dot(dy, b.to(tl.float32), input_precision="ieee")
        else:
            dyb += tl.dot(dy, b)
        if HAS_DX:
            w = tl.load(W + ns[:, None] * K + ks[None, :], mask=(ns[:, None] < N) & (ks[None, :] < K), other=0.0)
            if IEEE:
                acc += tl.dot(dy, w.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(dy, w)
    if HAS_DX:
        a = tl.load(A + ranks[:, None] * K + ks[None, :], mask=(ranks[:, None] < R) & (ks[None, :] < K), other=0.0)
        if IEEE:
            acc += scaling * tl.dot(dyb, a.to(tl.float32), input_precision="ieee")
        else:
            acc += scaling * tl.dot(dyb.to(a.dtype), a)
        tl.store(DX + rows[:, None] * K + ks[None, :], acc.to(DX.dtype.element_ty),
                 mask=(rows[:, None] < M) & (ks[None, :] < K))
    if HAS_DYB:
        if pid_k == 0:  # for dA
            tl.store(DYB + rows[:, None] * R + ranks[None, :], dyb, mask=(rows[:, None] < M) & (ranks[None, :] < R))


@triton.jit
def _lora_bwd_dw(DY, X, XA, DYB, DW, DA, DB, DBIAS, M, N, K, R, scaling, tiles_n, tiles_k,
                 HAS_DW: tl.constexpr, HAS_DA: tl.constexpr, HAS_DB: tl.constexpr,
                 HAS_DBIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    if HAS_DW:  # every (out tile, in tile)
        pid_n = pid // tiles_k
        pid_k = pid % tiles_k
    else:  # frozen base weight: only the first row and first column of tiles have work
        pid_n = tl.where(pid < tiles_n, pid, 0)
        pid_k = tl.where(pid < tiles_n, 0, pid - tiles_n + 1)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, BLOCK_R)
    acc_w = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc_b = tl.zeros([BLOCK_N, BLOCK_R], tl.float32)
    acc_a = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
    acc_bias = tl.zeros([BLOCK_N], tl.float32)
    n_end = N
    k_end = K
    if not HAS_DW:  # a program reads only what its own gradients need: dy for dB, x for dA
        n_end = tl.where(pid_k == 0, N, 0)
        k_end = tl.where(pid_n == 0, K, 0)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        dy = tl.load(DY + rows[:, None] * N + ns[None, :], mask=(rows[:, None] < M) & (ns[None, :] < n_end),
                     other=0.0)
        x = tl.load(X + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < k_end),
                    other=0.0)
        if IEEE:
            dy, x = dy.to(tl.float32), x.to(tl.float32)
        if HAS_DW:
            if IEEE:
                acc_w += tl.dot(tl.trans(dy), x, input_precision="ieee")
            else:
                acc_w += tl.dot(tl.trans(dy), x)
        if HAS_DB or HAS_DBIAS:
            if pid_k == 0:
                if HAS_DBIAS:
                    acc_bias += tl.sum(dy.to(tl.float32), axis=0)
                if HAS_DB:
                    xa = tl.load(XA + rows[:, None] * R + ranks[None, :],
                                 mask=(rows[:, None] < M) & (ranks[None, :] < R), other=0.0)
                    if IEEE:
                        acc_b += tl.dot(tl.trans(dy), xa, input_precision="ieee")
                    else:
                        acc_b += tl.dot(tl.trans(dy), xa.to(dy.dtype))
        if HAS_DA:
            if pid_n == 0:
                dyb = tl.load(DYB + rows[:, None] * R + ranks[None, :],
                              mask=(rows[:, None] < M) & (ranks[None, :] < R), other=0.0)
                if IEEE:
                    acc_a += tl.dot(tl.trans(dyb), x, input_precision="ieee")
                else:
                    acc_a += tl.dot(tl.trans(dyb.to(x.dtype)), x)
    if HAS_DW:
        tl.store(DW + ns[:, None] * K + ks[None, :], acc_w.to(DW.dtype.element_ty),
                 mask=(ns[:, None] < N) & (ks[None, :] < K))
    if pid_k == 0:
        if HAS_DB:
            tl.store(DB + ns[:, None] * R + ranks[None, :], (scaling * acc_b).to(DB.dtype.element_ty),
                     mask=(ns[:, None] < N) & (ranks[None, :] < R))
        if HAS_DBIAS:
            tl.store(DBIAS + ns, acc_bias.to(DBIAS.dtype.element_ty), mask=ns < N)
    if HAS_DA:
        if pid_n == 0:
            tl.store(DA + ranks[:, None] * K + ks[None, :], (scaling * acc_a).to(DA.dtype.element_ty),
                     mask=(ranks[:, None] < R) & (ks[None, :] < K))


def backward(dy2d, x2d, weight, lora_a, lora_b, xa, scaling, needs_dx, needs_dw, needs_da,
             needs_db, needs_dbias):
    """``(dx, dW, dA, dB, dbias)`` of :func:`forward` for the output gradient ``dy2d [M, out]``;
    ``None`` for each gradient not asked for."""
    m, k = x2d.shape
    n, r = weight.shape[0], lora_a.shape[0]
    ieee = dy2d.dtype == torch.float32 or interpreter_on()
    block_r = max(next_power_of_2(r), 16)
    dx = torch.empty(m, k, dtype=x2d.dtype, device=x2d.device) if needs_dx else None
    dyb = torch.empty(m, r, dtype=torch.float32, device=x2d.device) if needs_da else None
    if needs_dx or needs_da:
        # without dx the grid shrinks to one program per row tile that only computes dy B
        grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(k, BLOCK_K) if needs_dx else 1)
        _lora_bwd_dx[grid](dy2d, weight, lora_a, lora_b, dy2d if dx is None else dx,
                           dy2d if dyb is None else dyb, m, n, k, r, scaling, HAS_DX=needs_dx,
                           HAS_DYB=needs_da, IEEE=ieee, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                           BLOCK_R=block_r)
    dw = torch.empty_like(weight) if needs_dw else None
    da = torch.empty_like(lora_a) if needs_da else None
    db = torch.empty_like(lora_b) if needs_db else None
    dbias = torch.empty(n, dtype=dy2d.dtype, device=dy2d.device) if needs_dbias else None
    if needs_dw or needs_da or needs_db or needs_dbias:
        tiles_n, tiles_k = triton.cdiv(n, BLOCK_N), triton.cdiv(k, BLOCK_K)
        programs = tiles_n * tiles_k if needs_dw else tiles_n + tiles_k - 1
        _lora_bwd_dw[(programs,)](dy2d, x2d, xa, dy2d if dyb is None else dyb,
                                  *(dy2d if t is None else t for t in (dw, da, db, dbias)),
                                  m, n, k, r, scaling, tiles_n, tiles_k, HAS_DW=needs_dw,
                                  HAS_DA=needs_da, HAS_DB=needs_db, HAS_DBIAS=needs_dbias,
                                  IEEE=ieee, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                  BLOCK_R=block_r)
    return dx, dw, da, db, dbias


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
