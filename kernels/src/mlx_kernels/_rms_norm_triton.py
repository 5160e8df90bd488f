"""Triton RMSNorm: one program per row forward; blocks of rows backward (partial dW per block)."""

import torch
import triton
import triton.language as tl

from mlx_kernels._grid import next_power_of_2


@triton.jit
def _rms_norm_fwd(X, W, Y, RSTD, H, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(X + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    # HF order: normalise in fp32, round to the input dtype, then scale by the weight. The
    # product is taken in fp32 and rounded once, as torch does for half-precision operands.
    normed = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * H + cols, (w * normed).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd(DY, X, W, RSTD, DX, DW_PARTIAL, N, H, ROWS_PER_PROGRAM, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid * ROWS_PER_PROGRAM
    for row in range(start, tl.minimum(start + ROWS_PER_PROGRAM, N)):
        x = tl.load(X + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        normed = x * rstd
        d_normed = dy * w
        dx = rstd * (d_normed - normed * tl.sum(d_normed * normed, axis=0) / H)
        tl.store(DX + row * H + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * normed.to(X.dtype.element_ty).to(tl.float32)
    tl.store(DW_PARTIAL + pid * H + cols, dw, mask=mask)


def forward(x2d: torch.Tensor, weight: torch.Tensor, eps: float):
    n, h = x2d.shape
    y = torch.empty(n, h, dtype=torch.promote_types(x2d.dtype, weight.dtype), device=x2d.device)
    rstd = torch.empty(n, dtype=torch.float32, device=x2d.device)
    _rms_norm_fwd[(n,)](x2d, weight, y, rstd, h, eps, BLOCK=next_power_of_2(h))
    return y, rstd


def backward(dy2d, x2d, weight, rstd):
    n, h = x2d.shape
    programs = min(n, 256)
    rows_per_program = -(-n // programs)
    dx = torch.empty_like(x2d)
    dw_partial = torch.empty(programs, h, dtype=torch.float32, device=x2d.device)
    _rms_norm_bwd[(programs,)](dy2d, x2d, weight, rstd, dx, dw_partial, n, h, rows_per_program,
                               BLOCK=next_power_of_2(h))
    return dx, dw_partial.sum(0).to(weight.dtype)
