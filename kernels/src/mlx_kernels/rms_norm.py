"""RMSNorm, exactly as HF's ``LlamaRMSNorm``: ``w * (x * rsqrt(mean(x²) + eps)).to(x.dtype)``."""

from __future__ import annotations

import torch

from mlx_kernels.dispatch import backend_for


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class RMSNormTorchFunction(torch.autograd.Function):
    """The reference's math with a lean backward: saves x and the per-row rstd only (autograd
    on the reference would keep the fp32 copy and the normalised tensor too)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        h = x.float()
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (h * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        dw = (dy * normed.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        d_normed = (dy * weight).float()
        dx = rstd * (d_normed - normed * (d_normed * normed).mean(-1, keepdim=True))
        return dx.to(x.dtype), None if dw is None else dw.to(weight.dtype), None


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
    return RMSNormTorchFunction.apply(x, weight, eps)
