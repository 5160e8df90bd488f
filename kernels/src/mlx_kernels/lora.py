"""LoRA linear: ``y = x Wᵀ + b + s · (x Aᵀ) Bᵀ``, and its multi-adapter form for serving.

Shapes: ``x [..., in]``, ``weight [out, in]``, ``lora_a [r, in]``, ``lora_b [out, r]``.
The multi-adapter form takes stacks ``lora_a [n, r, in]``, ``lora_b [n, out, r]``,
``scalings [n]`` and one adapter index per token row (``-1``: the base model only), so requests
for different adapters run in one batch (Punica's shrink/expand, "BGMV").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlx_kernels.dispatch import backend_for


def _lora_forward(x, weight, lora_a, lora_b, scaling: float, bias=None):
    """The reference's output and ``x Aᵀ``."""
    y = F.linear(x, weight, bias)
    xa = F.linear(x, lora_a)
    # the low-rank product accumulates into the base output inside one GEMM (alpha = scaling):
    # no [N, out] temporaries for the scale and the sum
    out = y.reshape(-1, y.shape[-1]).addmm_(xa.reshape(-1, xa.shape[-1]), lora_b.t(), alpha=scaling)
    return out.view(y.shape), xa


def lora_linear_reference(x, weight, lora_a, lora_b, scaling: float, bias=None):
    return _lora_forward(x, weight, lora_a, lora_b, scaling, bias)[0]


class LoRALinearTorchFunction(torch.autograd.Function):
    """The reference's forward with a hand-written backward that adds the low-rank part of dx
    into the base part inside one GEMM, ``dx = dy W`` then ``dx += s (dy B) A`` (``addmm_``):
    autograd on the reference makes ``(s dy B) A`` and the sum as two more ``[N, in]`` tensors
    per layer. Saves what autograd would (x, the weights and ``x Aᵀ``); gradients not asked for
    (a frozen base weight) are not computed."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling, bias):
        out, xa = _lora_forward(x, weight, lora_a, lora_b, scaling, bias)
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa)
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_a, lora_b, xa = ctx.saved_tensors
        needs, s = ctx.needs_input_grad, ctx.scaling
        dy2d = dy.reshape(-1, dy.shape[-1])
        x2d = x.reshape(-1, x.shape[-1])
        dy_b = dy2d @ lora_b  # [N, r]
        dx = dw = da = db = dbias = None
        if needs[0]:
            dx = (dy2d @ weight).addmm_(dy_b, lora_a, alpha=s).view(x.shape)
        if needs[1]:
            dw = dy2d.t() @ x2d
        if needs[2]:
            da = (dy_b.t() @ x2d).mul_(s)
        if needs[3]:
            db = (dy2d.t() @ xa.reshape(-1, xa.shape[-1])).mul_(s)
        if ctx.has_bias and needs[5]:
            dbias = dy2d.sum(0)
        return dx, dw, da, db, None, dbias


class LoRALinearFunction(torch.autograd.Function):
    """Triton forward (base and low-rank product in one pass over x) and backward: one pass over
    dy gives dx = dy W + s (dy B) A (and dy B, kept for dA), one pass over the rows gives
    dW = dyᵀ x, dA = s (dy B)ᵀ x, dB = s dyᵀ (x Aᵀ) (x Aᵀ saved by the forward) and dbias.
    Gradients not asked for (a frozen base weight) cost nothing."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling, bias):
        from mlx_kernels import _lora_triton

        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        weight, lora_a, lora_b = weight.contiguous(), lora_a.contiguous(), lora_b.contiguous()
        y, xa = _lora_triton.forward(x2d, weight, lora_a, lora_b, scaling, bias)
        ctx.save_for_backward(x2d, weight, lora_a, lora_b, xa)
        ctx.scaling, ctx.has_bias, ctx.x_shape = scaling, bias is not None, x.shape
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        from mlx_kernels import _lora_triton

        x2d, weight, lora_a, lora_b, xa = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, dw, da, db, dbias = _lora_triton.backward(
            dy.reshape(-1, dy.shape[-1]).contiguous(), x2d, weight, lora_a, lora_b, xa,
            ctx.scaling, needs[0], needs[1], needs[2], needs[3], ctx.has_bias and needs[5])
        return None if dx is None else dx.view(ctx.x_shape), dw, da, db, None, dbias


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x Wᵀ + b + scaling · (x Aᵀ) Bᵀ``; differentiable in x, W, A, B and b."""
    if lora_a.shape[1] != weight.shape[1] or lora_b.shape != (weight.shape[0], lora_a.shape[0]):
        raise ValueError(f"lora_linear: weight [out, in] = {tuple(weight.shape)} needs lora_a "
                         f"[r, in] and lora_b [out, r]; got {tuple(lora_a.shape)}, {tuple(lora_b.shape)}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # what autocast does for F.linear: every operand in its dtype (differentiable casts, so
        # fp32 parameters get fp32 gradients), the product computed without autocast
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, lora_a, lora_b = (t.to(dtype) for t in (x, weight, lora_a, lora_b))
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return lora_linear(x, weight, lora_a, lora_b, scaling, bias)
    if backend_for(x.device) == "triton":
        return LoRALinearFunction.apply(x, weight, lora_a, lora_b, float(scaling), bias)
    return LoRALinearTorchFunction.apply(x, weight, lora_a, lora_b, float(scaling), bias)


def add_lora_multi_reference(x, y, lora_a, lora_b, adapter_ids, scalings):
    for adapter in adapter_ids.unique().tolist():
        if adapter < 0:
            continue
        rows = adapter_ids == adapter
        delta = F.linear(F.linear(x[rows], lora_a[adapter]), lora_b[adapter])
        y[rows] += scalings[adapter].to(y.dtype) * delta
    return y


def lora_linear_multi_reference(x, weight, lora_a, lora_b, adapter_ids, scalings, bias=None):
    return add_lora_multi_reference(x, F.linear(x, weight, bias), lora_a, lora_b, adapter_ids,
                                    scalings)


def add_lora_multi(x: torch.Tensor, y: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   adapter_ids: torch.Tensor, scalings: torch.Tensor) -> torch.Tensor:
    """Add each row's adapter to a base layer's output ``y [N, out]`` in place and return it:
    ``y[i] += scalings[s] * B[s] A[s] x[i]`` for ``s = adapter_ids[i]`` (-1: none). The base may
    be any layer (a quantized one included). Inference only."""
    if lora_a.dim() != 3 or lora_b.shape != (lora_a.shape[0], y.shape[1], lora_a.shape[1]):
        raise ValueError(f"lora_linear_multi: stacks must be lora_a [n, r, in] and lora_b "
                         f"[n, out, r]; got {tuple(lora_a.shape)}, {tuple(lora_b.shape)}")
    if adapter_ids.shape != x.shape[:1] or scalings.shape != lora_a.shape[:1]:
        raise ValueError("adapter_ids must be [N] and scalings [n_adapters]")
    if backend_for(x.device) == "triton":
        from mlx_kernels import _lora_triton

        if not y.is_contiguous():
            y = y.contiguous()
        _lora_triton.add_multi(x.contiguous(), lora_a.contiguous(), lora_b.contiguous(),
                               adapter_ids.contiguous(), scalings.float().contiguous(), y)
        return y
    return add_lora_multi_reference(x, y, lora_a, lora_b, adapter_ids, scalings)


def lora_linear_multi(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                      lora_b: torch.Tensor, adapter_ids: torch.Tensor, scalings: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row adapters: ``x [N, in]``, stacks ``lora_a [n, r, in]``, ``lora_b [n, out, r]``,
    ``adapter_ids [N]`` (int, -1 = none), ``scalings [n]``. Returns ``[N, out]``. Inference only."""
    return add_lora_multi(x, F.linear(x, weight, bias), lora_a, lora_b, adapter_ids, scalings)
