"""Pieces shared by the Triton GEMMs whose weight is de-quantized tile by tile (NF4, int8/int4)."""

import triton
import triton.language as tl


@triton.jit
def add_x_wt(acc, x, w, IEEE: tl.constexpr):
    """``acc + x @ wᵀ``: fp32 IEEE products (exact references, the interpreter) or x's dtype."""
    if IEEE:
        return acc + tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    return acc + tl.dot(x, tl.trans(w.to(x.dtype)))


@triton.jit
def store_plus_bias(Y, BIAS, acc, rows, cols, M, N, HAS_BIAS: tl.constexpr):
    """``Y[rows, cols] = acc (+ BIAS[cols])`` in Y's dtype, masked to ``[M, N]``."""
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * N + cols[None, :], acc.to(Y.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))
