"""GELU with the tanh approximation (GPT-2's ``gelu_new``) and the gated form GeGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlx_kernels.dispatch import backend_for


def geglu_reference(gate: torch.Tensor, up: torch.Tensor | None) -> torch.Tensor:
    act = F.gelu(gate, approximate="tanh")
    return act if up is None else act * up


class GeGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        from mlx_kernels import _geglu_triton

        gate = gate.contiguous()
        up = None if up is None else up.contiguous()
        ctx.save_for_backward(gate, up)
        return _geglu_triton.forward(gate, up)

    @staticmethod
    def backward(ctx, dy):
        from mlx_kernels import _geglu_triton

        gate, up = ctx.saved_tensors
        return _geglu_triton.backward(dy.contiguous(), gate, up)


def _dispatch(gate, up):
    if backend_for(gate.device) == "triton":
        return GeGLUFunction.apply(gate, up)
    return geglu_reference(gate, up)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x³)))``, any shape; differentiable."""
    return _dispatch(x, None)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(gate) * up`` for two tensors of one shape; differentiable in both."""
    if gate.shape != up.shape:
        raise ValueError(f"geglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    return _dispatch(gate, up)
