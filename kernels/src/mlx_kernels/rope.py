"""Rotary position embedding, HF convention: ``x * cos + rotate_half(x) * sin``."""

from __future__ import annotations

import torch

from mlx_kernels.dispatch import backend_for


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return x * cos + rotate_half(x) * sin


class RoPETorchFunction(torch.autograd.Function):
    """The reference's math saving only cos and sin (autograd would keep the rotated halves);
    the backward applies the transposed rotation: ``dy * cos + R^T(dy * sin)``."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rope_reference(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        rotated = dy * sin.unsqueeze(1)
        r1, r2 = rotated.chunk(2, dim=-1)
        return dy * cos.unsqueeze(1) + torch.cat((r2, -r1), dim=-1), None, None


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
    return RoPETorchFunction.apply(x, cos, sin)
