"""Triton dequant-matmul for the int8 and int4 weight layouts (``quantized_linear``).

``y = x Wᵀ (+ b)`` with ``W`` read as it is stored: each (out, in) tile is de-quantized in
registers inside the GEMM's loop (int8 times its group's scale; int4 unpacked from its byte's
nibble, times the group's scale plus its min), so a full-precision weight never exists in
memory. One kernel serves int8 per output channel (one group of ``K``), int8 in groups (GGUF
Q8_0) and int4 in groups. Inference only: under autograd the torch reference runs.
"""

import torch
import triton
import triton.language as tl

from mlx_kernels._gemm_triton import add_x_wt, store_plus_bias
from mlx_kernels.dispatch import interpreter_on

BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32  # decode's tiles, and the interpreter's (tests run fast)


def tiles(m: int) -> dict:
    """Tile sizes and launch options for ``m`` rows. More than 16 rows reuse each de-quantized
    tile across rows: wide tiles for the tensor cores, 4-8x faster than 16x32x32 at 256-4096
    rows on an H200 (benchmarks/gpu_kernels_check.py). Up to 16 rows the small tiles stay: a
    16x32x256 tile with 4 stages measured no faster at 4096 outputs and 1.6x slower at 576."""
    if interpreter_on() or m <= 16:
        return dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    if m <= 128:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


@triton.jit
def _quantized_matmul(X, Q, SCALES, MINS, BIAS, Y, M, N, K, GROUP, GROUPS,
                      INT4: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rows[:, None] * K + ks[None, :],
                    mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        w_mask = (cols[:, None] < N) & (ks[None, :] < K)
        group = cols[:, None] * GROUPS + ks[None, :] // GROUP
        scale = tl.load(SCALES + group, mask=w_mask, other=0.0).to(tl.float32)
        if INT4:
            byte = tl.load(Q + cols[:, None] * (K // 2) + ks[None, :] // 2, mask=w_mask,
                           other=0).to(tl.int32)
            q = tl.where(ks[None, :] % 2 == 0, byte & 15, byte >> 4).to(tl.float32)
            w = q * scale + tl.load(MINS + group, mask=w_mask, other=0.0).to(tl.float32)
        else:
            q = tl.load(Q + cols[:, None] * K + ks[None, :], mask=w_mask, other=0).to(tl.float32)
            w = q * scale
        w = tl.where(w_mask, w, 0.0)
        acc = add_x_wt(acc, x, w, IEEE)
    store_plus_bias(Y, BIAS, acc, rows, cols, M, N, HAS_BIAS)


def matmul(x2d: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
           mins: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """``x2d [M, K] @ Wᵀ (+ bias)`` in x's dtype; int4 when ``mins`` is given, else int8 with
    ``scales`` ``[N]`` (per channel) or ``[N, K // G]``."""
    m, k = x2d.shape
    n = qweight.shape[0]
    scales = scales.reshape(n, -1).contiguous()
    groups = scales.shape[1]
    y = torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)
    launch = tiles(m)
    grid = (triton.cdiv(m, launch["BLOCK_M"]), triton.cdiv(n, launch["BLOCK_N"]))
    _quantized_matmul[grid](
        x2d.contiguous(), qweight.contiguous(), scales,
        scales if mins is None else mins.contiguous(), x2d if bias is None else bias.contiguous(),
        y, m, n, k, k // groups, groups, INT4=mins is not None, HAS_BIAS=bias is not None,
        IEEE=x2d.dtype == torch.float32 or interpreter_on(), **launch)
    return y
