"""RMSNorm, exactly as HF's ``LlamaRMSNorm``: ``w * (x * rsqrt(mean(x²) + eps)).to(x.dtype)``."""

from __future__ import annotations

import torch

from mlx_kernels.dispatch import backend_for


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        from mlx_kernels import _rms_norm_triton

        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        y, rstd = _rms_norm_triton.forward(x2d, weight.contiguous(), eps)
        ctx.save_for_backward(x2d, weight, rstd)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        from mlx_kernels import _rms_norm_triton

        x2d, weight, rstd = ctx.saved_tensors
        dy2d = dy.reshape(x2d.shape).contiguous()
        dx, dw = _rms_norm_triton.backward(dy2d, x2d, weight.contiguous(), rstd)
        return dx.view(dy.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMS-normalise over the last dim. ``x [..., H]`` (fp32/bf16/fp16), ``weight [H]``.

    Returns ``[..., H]`` in ``promote_types(x.dtype, weight.dtype)``. Differentiable in x and weight.
    """
    if backend_for(x.device) == "triton":
        return RMSNormFunction.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
