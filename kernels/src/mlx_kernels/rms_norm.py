"""RMSNorm, exactly as HF's ``LlamaRMSNorm``: ``w * (x * rsqrt(mean(x²) + eps)).to(x.dtype)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlx_kernels import _cpu_native
from mlx_kernels.dispatch import backend_for, eager_inference, native_cpu, records_autograd


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class RMSNormTorchFunction(torch.autograd.Function):
    """The reference's math with a lean backward: saves x and the per-row rstd only (autograd
    on the reference would keep the fp32 copy and the normalised tensor too), and few full-size
    temporaries (each a fresh page-faulted block on CPU): the forward scales in place, the
    backward builds dx in one buffer and takes the row dot products without a product tensor."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        h = x.float()
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        normed = h * rstd
        if x.dtype == torch.float32 and weight.dtype == torch.float32:
            return normed.mul_(weight)  # == weight * normed, bit for bit
        return weight * normed.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd  # fresh: in-place below is safe
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy * normed.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        d_normed = (dy * weight).float()  # fresh (a product), so it can hold dx
        mean_dot = torch.linalg.vecdot(d_normed, normed).unsqueeze(-1).div_(x.shape[-1])
        dx = d_normed.sub_(normed.mul_(mean_dot)).mul_(rstd)
        return dx.to(x.dtype), dw, None


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
    if not records_autograd(x, weight):
        # inference mode only: under plain no_grad the value may be a recomputed activation
        # (recompute.py), which must equal the autograd forward's bit for bit
        if (eager_inference() and x.is_contiguous() and weight.is_contiguous()
                and x.numel() and native_cpu(x, weight)):
            out = torch.empty_like(x)
            _cpu_native.library().rms_norm_f32(x.data_ptr(), weight.data_ptr(), out.data_ptr(),
                                               x.numel() // x.shape[-1], x.shape[-1], eps)
            return out
        if x.dtype == weight.dtype == torch.float32:
            # torch's fused kernel, one op instead of six: the reference's fp32 math (the tests
            # hold it to the reference)
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        return rms_norm_reference(x, weight, eps)
    return RMSNormTorchFunction.apply(x, weight, eps)
