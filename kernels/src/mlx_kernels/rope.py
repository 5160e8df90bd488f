"""Rotary position embedding, HF convention: ``x * cos + rotate_half(x) * sin``."""

from __future__ import annotations

import torch

from mlx_kernels import _cpu_native
from mlx_kernels.dispatch import backend_for, native_cpu, records_autograd


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return x * cos + rotate_half(x) * sin


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``x * cos + R(x) * sin`` with ``R = rotate_half`` (``transpose``: ``R^T``) in one output
    and one half-size scratch buffer instead of five full-size temporaries. The arithmetic is
    the reference's (each product rounded, then one add or subtract), so the bits are too."""
    h = x.shape[-1] // 2
    x_lo, x_hi = x[..., :h], x[..., h:]
    out = x * cos
    lo, hi = out[..., :h], out[..., h:]
    # R(x) = [-x_hi, x_lo]; R^T(x) = [x_hi, -x_lo]
    if transpose:
        scratch = torch.mul(x_hi, sin[..., h:])
        lo.add_(scratch)
        hi.sub_(torch.mul(x_lo, sin[..., :h], out=scratch))
    else:
        scratch = torch.mul(x_hi, sin[..., :h])
        lo.sub_(scratch)
        hi.add_(torch.mul(x_lo, sin[..., h:], out=scratch))
    return out


class RoPETorchFunction(torch.autograd.Function):
    """The reference's math saving only cos and sin (autograd would keep the rotated halves);
    the backward applies the transposed rotation: ``dy * cos + R^T(dy * sin)``."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
        if not x.dtype == cos.dtype == sin.dtype:  # the reference's type promotion
            return x * cos + rotate_half(x) * sin
        return _rotate(x, cos, sin, transpose=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        if not dy.dtype == cos.dtype == sin.dtype:
            r1, r2 = (dy * sin).chunk(2, dim=-1)
            return dy * cos + torch.cat((r2, -r1), dim=-1), None, None
        return _rotate(dy, cos, sin, transpose=True), None, None


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        from mlx_kernels import _rope_triton

        cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        return _rope_triton.apply(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy):
        from mlx_kernels import _rope_triton

        cos, sin = ctx.saved_tensors
        return _rope_triton.apply(dy, cos, sin, backward=True), None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, H, T, D]`` by ``cos, sin [B, T, D]`` (``D`` even; cos/sin as HF builds them,
    ``cat(freqs, freqs)``). Returns ``[B, H, T, D]`` in x's dtype; differentiable in x."""
    if x.shape[-1] % 2:
        raise ValueError(f"rope needs an even head dim, got {x.shape[-1]}")
    if cos.shape != (x.shape[0], x.shape[2], x.shape[3]) or sin.shape != cos.shape:
        raise ValueError(
            f"rope: cos/sin must be [B, T, D] = {(x.shape[0], x.shape[2], x.shape[3])}, "
            f"got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    if backend_for(x.device) == "triton":
        return RoPEFunction.apply(x, cos, sin)
    if not records_autograd(x, cos, sin):  # the Function's forward, without its bookkeeping
        if x.numel() and x.stride(-1) == 1 and native_cpu(x, cos, sin):
            return _rope_native(x, cos, sin)
        if x.dtype == cos.dtype == sin.dtype:
            return _rotate(x, cos.unsqueeze(1), sin.unsqueeze(1), transpose=False)
        return rope_reference(x, cos, sin)
    return RoPETorchFunction.apply(x, cos, sin)


def _rope_native(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``_rotate``'s arithmetic, bit for bit, in one C call (``rope_f32``): fp32 on CPU, ``x``
    with unit stride along D. The output is laid out as ``x * cos`` lays it out: heads inside
    tokens when ``x`` is a view of a projection's ``[B, T, H * D]`` output (so the attention
    that reads it token by token needs no copy), else ``[B, H, T, D]`` contiguous."""
    b, h, t, d = x.shape
    cos, sin = cos.contiguous(), sin.contiguous()
    if x.stride(1) < x.stride(2):
        out = x.new_empty(b, t, h, d).transpose(1, 2)
    else:
        out = x.new_empty(b, h, t, d)
    _cpu_native.library().rope_f32(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(),
                                   b, h, t, d, *x.stride()[:3], *out.stride()[:3])
    return out
