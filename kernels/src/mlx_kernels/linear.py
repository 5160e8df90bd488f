"""``y = x W^T + b`` with the GEMM layout chosen for the CPU's small-batch inference.

On CPU, MKL's fp32 GEMM for ``x [M, K] @ W^T`` with ``M`` between 8 and 48 rows (a serving
step's decodes, a short prompt after a cached prefix) is slower than the transposed product.
Measured here over the built-in model's 211 weights (median of 9 alternating passes): 8 rows
70 -> 60 ms, 24 rows 91 -> 82 ms, 48 rows 129 -> 112 ms for ``x @ W^T`` -> ``(W @ x^T)^T``; at 4 rows (57 vs 62 ms) and 64 rows (157 vs 190 ms) the usual layout is the
faster one. Inference only (no autograd graph is built on this path); on CUDA, under
autograd, in other dtypes or with ``MLX_KERNELS=torch`` this is ``F.linear``. The result equals
``F.linear``'s to fp32 rounding (another summation order inside the GEMM).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlx_kernels.dispatch import setting

# the rows for which W @ x^T is the faster GEMM on CPU (bounds, not a range: under torch.compile
# with dynamic shapes the row count is symbolic, which `in range(...)` cannot take)
TRANSPOSED_ROWS = (8, 48)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           contiguous: bool = True) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; see the module docstring for when the GEMM is transposed.

    ``contiguous=False`` lets the transposed GEMM's result out as it is, a transposed view
    (strides ``(1, rows)`` over the rows and features), saving a copy that costs up to a fifth
    of the GEMM at these sizes: for a consumer that reads it elementwise or feeds it to the
    next ``linear`` (for which it is the layout the transposed GEMM reads without a copy)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (TRANSPOSED_ROWS[0] <= rows <= TRANSPOSED_ROWS[1] and x.device.type == "cpu" and not torch.is_grad_enabled()
            and x.dtype == weight.dtype == torch.float32 and setting() == "auto"):
        y = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t()
        if contiguous:
            y = y.contiguous()
        if bias is not None:
            y = y.add_(bias)
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)
