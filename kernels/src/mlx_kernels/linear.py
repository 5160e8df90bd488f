"""``y = x W^T + b`` with the GEMM layout chosen for the CPU's small-batch inference.

On CPU, MKL's fp32 GEMM for ``x [M, K] @ W^T`` with ``M`` between 8 and 48 rows (a serving
step's decodes, a short prompt after a cached prefix) is slower than the transposed product.
Measured here over the built-in model's 211 weights (median of 9 alternating passes): 8 rows
70 -> 60 ms, 24 rows 91 -> 82 ms, 48 rows 129 -> 112 ms for ``x @ W^T`` -> ``(W @ x^T)^T``; at 4 rows (57 vs 62 ms) and 64 rows (157 vs 190 ms) the usual layout is the
faster one. Inference only (no autograd graph is built on this path); on CUDA, under
autograd, in other dtypes or with ``MLX_KERNELS=torch`` this is ``F.linear``. The result equals
``F.linear``'s to fp32 rounding (another summation order inside the GEMM).

A weight packed once (``pack_weight``: oneDNN's blocked layout, as the CPU backends of vLLM and
IPEX do) skips the packing MKL repeats inside every GEMM call, which costs most at few rows. Over
the built-in model's 211 weights (median of 5 alternating passes), ``linear`` -> packed: 1 row
45.5 -> 32.6 ms, 4 rows 85.7 -> 38.9, 16 rows 104 -> 76, 128 rows 327 -> 283, 512 rows 1203 ->
1099. Which layout wins depends on the CPU (``packing_pays_off`` times both on the machine at
hand). A packed copy holds as much memory again as its weight, so packing is asked for (the
serving engine does, ``mlx_core.prepack_linear_weights``), never done behind a caller's back.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from mlx_kernels.dispatch import setting

# the rows for which W @ x^T is the faster GEMM on CPU (bounds, not a range: under torch.compile
# with dynamic shapes the row count is symbolic, which `in range(...)` cannot take)
TRANSPOSED_ROWS = (8, 48)


# the batch size oneDNN chooses the packed layout for: a serving step's decodes (measured the
# same as 2048 at 512-2048 rows, and faster than 1 at 4-64 rows)
PACKED_ROWS_HINT = 64


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedWeight:
    """A CPU fp32 linear weight in oneDNN's blocked layout, for inference. It remembers which
    tensor, at which version, it was packed from: after an in-place change to the weight
    (``load_state_dict``, a merged adapter) or for another tensor (a copied model) it packs
    again before use, so it never computes with stale values."""

    def __init__(self, weight: torch.Tensor | None = None, rows_hint: int = PACKED_ROWS_HINT):
        self.rows_hint = rows_hint
        self.data, self._source = None, None
        if weight is not None:
            self._pack(weight)

    def _pack(self, weight: torch.Tensor) -> None:
        self.data = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), self.rows_hint)
        self._source = _identity(weight)

    def for_weight(self, weight: torch.Tensor):
        if torch.compiler.is_compiling():  # packed by the eager calls before compiling
            return self.data
        if self._source != _identity(weight):
            self._pack(weight)
        return self.data

    def __deepcopy__(self, memo):  # a copy belongs to a copied weight: it packs on first use
        return PackedWeight(rows_hint=self.rows_hint)

    def __getstate__(self):
        return {"rows_hint": self.rows_hint, "data": None, "_source": None}


def _identity(weight: torch.Tensor) -> tuple[int, int]:
    # an inference tensor (made under inference_mode) has no version counter: only its storage
    return weight.data_ptr(), -1 if weight.is_inference() else weight._version


def pack_weight(weight: torch.Tensor, rows_hint: int = PACKED_ROWS_HINT) -> PackedWeight | None:
    """The packed form of a ``[out, in]`` weight for ``linear(..., packed=)``, or None where
    ``linear`` would not use it: not on CPU, not fp32, or torch built without oneDNN."""
    if (weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2
            or not packing_available()):
        return None
    return PackedWeight(weight, rows_hint)


# row counts a serving engine's GEMMs see: a few decodes, a short prefill, a full decode batch
CALIBRATION_ROWS = (4, 24, 64)


def packing_pays_off(weight: torch.Tensor, rows: tuple[int, ...] = CALIBRATION_ROWS,
                     repeats: int = 3) -> bool:
    """Whether ``linear`` on this weight runs faster packed than as it is on this machine, at
    every row count in ``rows`` (the best of ``repeats`` interleaved timings each: the least
    disturbed by other work). Which wins depends on the CPU: on an AMD EPYC (AVX2) dev machine
    packed won at 1-512 rows; on an Intel AVX-512 one, MKL's transposed GEMM won at 24 rows
    (packed 1.2x slower)."""
    packed = pack_weight(weight)
    if packed is None:
        return False
    with torch.inference_mode():
        for count in rows:
            x = torch.randn(count, weight.shape[1])
            best = {None: float("inf"), packed: float("inf")}
            for _ in range(repeats + 1):  # the first pass warms caches and allocator
                for layout in best:
                    start = time.perf_counter()
                    linear(x, weight, packed=layout)
                    best[layout] = min(best[layout], time.perf_counter() - start)
            if best[packed] >= best[None]:
                return False
    return True


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           contiguous: bool = True, packed: PackedWeight | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; see the module docstring for when the GEMM is transposed.

    ``contiguous=False`` lets the transposed GEMM's result out as it is, a transposed view
    (strides ``(1, rows)`` over the rows and features), saving a copy that costs up to a fifth
    of the GEMM at these sizes: for a consumer that reads it elementwise or feeds it to the
    next ``linear`` (for which it is the layout the transposed GEMM reads without a copy).

    ``packed`` (``pack_weight(weight)``) runs the GEMM on the prepacked weight; its output is
    always contiguous."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    cpu_inference = (x.device.type == "cpu" and not torch.is_grad_enabled()
                     and x.dtype == weight.dtype == torch.float32 and setting() == "auto")
    if packed is not None and cpu_inference and rows:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]).contiguous(),
                                               packed.for_weight(weight), bias, "none", [], "")
        return y.view(*x.shape[:-1], weight.shape[0])
    if TRANSPOSED_ROWS[0] <= rows <= TRANSPOSED_ROWS[1] and cpu_inference:
        y = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t()
        if contiguous:
            y = y.contiguous()
        if bias is not None:
            y = y.add_(bias)
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)
