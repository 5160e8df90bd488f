"""Triton RoPE (HF rotate_half convention): one program per (batch, head, position) row."""

import torch
import triton
import triton.language as tl

from mlx_kernels._grid import next_power_of_2


@triton.jit
def _rope_rows(X, COS, SIN, OUT, HEADS, T, stride_b, stride_h, stride_t, HALF,
               BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    b = row // (HEADS * T)
    h = (row // T) % HEADS
    t = row % T
    cols = tl.arange(0, BLOCK)
    mask = cols < HALF
    x_row = X + b * stride_b + h * stride_h + t * stride_t
    cs_row = (b * T + t) * 2 * HALF
    x1 = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF + cols, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(COS + cs_row + cols, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + cs_row + HALF + cols, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + cs_row + cols, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + cs_row + HALF + cols, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # transpose of the forward rotation
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:  # out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    out_row = OUT + row * 2 * HALF
    tl.store(out_row + cols, o1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(out_row + HALF + cols, o2.to(OUT.dtype.element_ty), mask=mask)


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """``x [B, H, T, D]`` (any strides with a unit last stride) -> contiguous ``[B, H, T, D]``."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    b, heads, t, d = x.shape
    out = torch.empty(b, heads, t, d, dtype=x.dtype, device=x.device)
    _rope_rows[(b * heads * t,)](
        x, cos, sin, out, heads, t, x.stride(0), x.stride(1), x.stride(2), d // 2,
        BACKWARD=backward, BLOCK=next_power_of_2(d // 2),
    )
    return out
