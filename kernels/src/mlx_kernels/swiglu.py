"""SwiGLU, the gated SiLU of Llama's MLP: ``silu(gate) * up``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlx_kernels.dispatch import backend_for


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class SwiGLUTorchFunction(torch.autograd.Function):
    """The reference's math saving only gate and up (autograd would keep silu(gate) too);
    the backward recomputes the sigmoid."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        g, sig = gate.float(), torch.sigmoid(gate.float())
        silu = g * sig
        d_gate = dy.float() * up.float() * sig * (1 + g * (1 - sig))
        return d_gate.to(gate.dtype), (dy.float() * silu).to(up.dtype)


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
    return SwiGLUTorchFunction.apply(gate, up)
