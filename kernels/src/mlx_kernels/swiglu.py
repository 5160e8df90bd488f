"""SwiGLU, the gated SiLU of Llama's MLP: ``silu(gate) * up``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlx_kernels import _cpu_native
from mlx_kernels.dispatch import backend_for, eager_inference, native_cpu, records_autograd


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class SwiGLUTorchFunction(torch.autograd.Function):
    """The reference's math saving only gate and up (autograd would keep silu(gate) too), with
    few full-size temporaries (each is a fresh page-faulted block on CPU): the forward writes
    the product into silu's output, the backward recomputes the sigmoid and builds each gradient
    in place in one buffer."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        out = F.silu(gate)
        return out.mul_(up) if up.dtype == out.dtype else out * up  # == silu(gate) * up

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        g, d = gate.float(), dy.float()  # in-place below only on fresh tensors, never on these
        sig = torch.sigmoid(g)
        d_up = (g * sig).mul_(d)  # dy * silu(g)
        # dy * up * sig * (1 + g * (1 - sig)): silu's derivative, in one buffer
        d_gate = torch.rsub(sig, 1).mul_(g).add_(1).mul_(sig).mul_(d).mul_(up.float())
        return d_gate.to(gate.dtype), d_up.to(up.dtype)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        from mlx_kernels import _swiglu_triton

        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return _swiglu_triton.forward(gate, up)

    @staticmethod
    def backward(ctx, dy):
        from mlx_kernels import _swiglu_triton

        gate, up = ctx.saved_tensors
        return _swiglu_triton.backward(dy.contiguous(), gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for two tensors of the same shape and dtype; differentiable in both."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    if backend_for(gate.device) == "triton":
        return SwiGLUFunction.apply(gate, up)
    if not records_autograd(gate, up):  # the Function's forward, without its bookkeeping
        # inference mode only: under plain no_grad the value may be a recomputed activation
        # (recompute.py), which must equal the autograd forward's bit for bit
        if eager_inference() and native_cpu(gate, up):
            if _same_dense_layout(gate, up):
                return _swiglu_native(gate, up)
            ld = _row_stride(gate)
            if ld is not None and ld == _row_stride(up):
                return _swiglu_native_rows(gate, up, ld)
        return F.silu(gate).mul_(up) if gate.dtype == up.dtype else swiglu_reference(gate, up)
    return SwiGLUTorchFunction.apply(gate, up)


def _same_dense_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Both laid out alike over one gap-free span of memory: contiguous, or the transposed view
    that ``linear(..., contiguous=False)`` returns; an elementwise op may then run over it flat."""
    if a.stride() != b.stride():
        return False
    expected = 1
    for size, stride in sorted(zip(a.shape, a.stride(), strict=True), key=lambda pair: pair[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _row_stride(t: torch.Tensor) -> int | None:
    """``t``'s elements as rows of its last dimension, each contiguous and all a fixed stride
    apart (the two halves of a fused gate/up projection's output): that stride, else None."""
    if t.dim() == 0 or t.stride(-1) != 1:
        return None
    try:
        rows = t.view(-1, t.shape[-1])
    except RuntimeError:  # the leading dimensions do not collapse into one stride
        return None
    return rows.stride(0)


def _swiglu_native(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``swiglu_f32`` of ``_cpu_kernels.c``: one pass, where torch makes two (fp32 CPU, inference
    mode, tensors of one dense layout, which the output keeps; within 5e-7 relative of the
    reference, see the C source)."""
    out = torch.empty_strided(gate.shape, gate.stride(), dtype=gate.dtype)
    n = gate.numel()
    _cpu_native.library().swiglu_f32(gate.data_ptr(), up.data_ptr(), out.data_ptr(), 1, n, n)
    return out


def _swiglu_native_rows(gate: torch.Tensor, up: torch.Tensor, ld: int) -> torch.Tensor:
    """``swiglu_f32`` over rows ``ld`` values apart (``_row_stride``): the slices of one fused
    gate/up output, read where they lie; the output is contiguous."""
    out = torch.empty(gate.shape, dtype=gate.dtype)
    cols = gate.shape[-1]
    _cpu_native.library().swiglu_f32(gate.data_ptr(), up.data_ptr(), out.data_ptr(),
                                     gate.numel() // cols if cols else 0, cols, ld)
    return out
