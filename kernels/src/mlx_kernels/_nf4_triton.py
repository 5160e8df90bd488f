"""Triton NF4 kernels.

- ``_dequant``: one program per 1024 output values; codes looked up in the 16-entry codebook and
  scaled by their block's absmax (the whole weight, for merging adapters into it).
- ``_nf4_matmul`` / ``_nf4_matmul_dx``: ``y = x Wᵀ (+ b)`` and ``dx = dy W`` with ``W`` read in its
  4-bit form. Each (out, in) tile of ``W`` is de-quantized in registers inside the GEMM's loop
  (codes, then the block absmax from its 8-bit double-quantized form), so the full-precision
  weight never exists in memory: 0.53 byte per weight value is read instead of 2 or 4.
"""

import torch
import triton
import triton.language as tl

from mlx_kernels._gemm_triton import add_x_wt, store_plus_bias
from mlx_kernels.dispatch import interpreter_on
from mlx_kernels.nf4_format import ABSMAX_BLOCK, BLOCK_SIZE, NF4_CODEBOOK

BLOCK = 1024
BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _dequant(CODES, ABSMAX, CODEBOOK, OUT, N, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    byte = tl.load(CODES + offs // 2, mask=mask, other=0).to(tl.int32)
    code = tl.where(offs % 2 == 0, byte >> 4, byte & 0xF)
    value = tl.load(CODEBOOK + code, mask=mask, other=0.0)
    scale = tl.load(ABSMAX + offs // GROUP, mask=mask, other=0.0)
    tl.store(OUT + offs, (value * scale).to(OUT.dtype.element_ty), mask=mask)


def dequantize(codes, absmax, shape, dtype):
    n = codes.numel() * 2
    out = torch.empty(n, dtype=dtype, device=codes.device)
    codebook = torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=codes.device)
    _dequant[(triton.cdiv(n, BLOCK),)](codes, absmax.contiguous(), codebook, out, n,
                                       GROUP=BLOCK_SIZE, BLOCK=BLOCK)
    return out.view(shape)


@triton.jit
def _nf4_tile(CODES, ABSMAX_Q, ABSMAX_SCALE, ABSMAX_OFFSET, CODEBOOK, ns, ks, N, K,
              W_DTYPE: tl.constexpr, GROUP: tl.constexpr, ABSMAX_GROUP: tl.constexpr):
    """``W[ns, ks]`` of an NF4 weight ``[N, K]`` as a tile in ``W_DTYPE``, zero out of bounds.

    Element ``(n, k)`` is value ``n K + k`` of the flat weight: blocks of ``GROUP`` values may
    straddle rows (only the total size must be a multiple of 64), so the flat index is used."""
    mask = (ns[:, None] < N) & (ks[None, :] < K)
    flat = ns[:, None].to(tl.int64) * K + ks[None, :]
    byte = tl.load(CODES + flat // 2, mask=mask, other=0).to(tl.int32)
    code = tl.where(flat % 2 == 0, byte >> 4, byte & 0xF)  # high nibble first
    value = tl.load(CODEBOOK + code)  # 0 <= code < 16 always
    block = flat // GROUP
    # double quantization undone per element, the same fp32 ops as nf4_absmax
    absmax_q = tl.load(ABSMAX_Q + block, mask=mask, other=128).to(tl.float32)
    scale = tl.load(ABSMAX_SCALE + block // ABSMAX_GROUP, mask=mask, other=0.0)
    absmax = (absmax_q - 128.0) * scale + tl.load(ABSMAX_OFFSET)
    # rounded to the weight's dtype first, as nf4_dequantize returns it
    return tl.where(mask, (value * absmax).to(W_DTYPE), 0.0)


@triton.jit
def _nf4_matmul(X, CODES, ABSMAX_Q, ABSMAX_SCALE, ABSMAX_OFFSET, CODEBOOK, BIAS, Y, M, N, K,
                HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, W_DTYPE: tl.constexpr,
                GROUP: tl.constexpr, ABSMAX_GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        w = _nf4_tile(CODES, ABSMAX_Q, ABSMAX_SCALE, ABSMAX_OFFSET, CODEBOOK, cols, ks, N, K,
                      W_DTYPE, GROUP, ABSMAX_GROUP)
        acc = add_x_wt(acc, x, w, IEEE)
    store_plus_bias(Y, BIAS, acc, rows, cols, M, N, HAS_BIAS)


@triton.jit
def _nf4_matmul_dx(DY, CODES, ABSMAX_Q, ABSMAX_SCALE, ABSMAX_OFFSET, CODEBOOK, DX, M, N, K,
                   IEEE: tl.constexpr, W_DTYPE: tl.constexpr, GROUP: tl.constexpr,
                   ABSMAX_GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(DY + rows[:, None] * N + ns[None, :], mask=(rows[:, None] < M) & (ns[None, :] < N), other=0.0)
        w = _nf4_tile(CODES, ABSMAX_Q, ABSMAX_SCALE, ABSMAX_OFFSET, CODEBOOK, ns, ks, N, K,
                      W_DTYPE, GROUP, ABSMAX_GROUP)
        if IEEE:
            acc += tl.dot(dy.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(dy, w.to(dy.dtype))
    tl.store(DX + rows[:, None] * K + ks[None, :], acc.to(DX.dtype.element_ty),
             mask=(rows[:, None] < M) & (ks[None, :] < K))


def _w_dtype(q):
    if q.dtype not in _TL_DTYPES:
        raise TypeError(f"the Triton nf4_matmul supports NF4 weights of dtype fp32, bf16 or fp16; "
                        f"got {q.dtype} (MLX_KERNELS=torch runs the reference)")
    return _TL_DTYPES[q.dtype]


def _nf4_args(q, device):
    codebook = torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=device)
    return (q.codes.contiguous(), q.absmax_q.contiguous(), q.absmax_scale.contiguous(),
            q.absmax_offset.reshape(1), codebook)


def matmul(x2d, q, bias):
    """``x2d [M, in] @ Wᵀ (+ bias)`` for the NF4 weight ``q`` (``[out, in]``), in x's dtype."""
    m, k = x2d.shape
    n = q.shape[0]
    y = torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    _nf4_matmul[grid](x2d, *_nf4_args(q, x2d.device), x2d if bias is None else bias, y, m, n, k,
                      HAS_BIAS=bias is not None, IEEE=x2d.dtype == torch.float32 or interpreter_on(),
                      W_DTYPE=_w_dtype(q), GROUP=BLOCK_SIZE, ABSMAX_GROUP=ABSMAX_BLOCK,
                      BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return y


def matmul_dx(dy2d, q):
    """``dy2d [M, out] @ W``: the input gradient of :func:`matmul`."""
    m, n = dy2d.shape
    k = q.shape[1]
    dx = torch.empty(m, k, dtype=dy2d.dtype, device=dy2d.device)
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(k, BLOCK_K))
    _nf4_matmul_dx[grid](dy2d, *_nf4_args(q, dy2d.device), dx, m, n, k,
                         IEEE=dy2d.dtype == torch.float32 or interpreter_on(),
                         W_DTYPE=_w_dtype(q), GROUP=BLOCK_SIZE, ABSMAX_GROUP=ABSMAX_BLOCK,
                         BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return dx
