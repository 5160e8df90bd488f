"""Mixture-of-experts: top-k softmax routing and the grouped expert matmul.

Routing follows Mixtral: softmax over all experts (fp32), keep the top ``k``, renormalise them
to sum to one (Qwen3-MoE's ``norm_topk_prob=false``: keep them as they are). The grouped
matmul multiplies rows already sorted by expert (``sort_by_expert``) with that expert's weight:
``out[i] = x[i] @ weights[e]ᵀ`` for rows ``offsets[e] <= i < offsets[e + 1]``.

Neither the routing, the sort nor the grouped matmul asks the host how many rows an expert got:
on CUDA the Triton kernels read the offsets on the device; the torch reference slices by them on
CPU (where reading a tensor is no device sync) and, under ``torch.compile`` or on another device,
runs each expert over every row and keeps its own (shape-static, E times the multiply-adds: the
decode step's few rows). Both are differentiable in ``x`` and ``weights``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlx_kernels.dispatch import backend_for, records_autograd


def moe_route_reference(router_logits, top_k: int, renormalize: bool = True):
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def _weights_of(router_logits, experts, renormalize):
    """Differentiable routing weights of already chosen experts."""
    weights = torch.softmax(router_logits.float(), dim=-1).gather(1, experts)
    return weights / weights.sum(dim=-1, keepdim=True) if renormalize else weights


def moe_route(router_logits: torch.Tensor, top_k: int, renormalize: bool = True):
    """``router_logits [N, E]`` -> ``(weights [N, k] fp32, experts [N, k] int64)``, experts in
    descending order of probability. The weights are differentiable in the logits."""
    if not 0 < top_k <= router_logits.shape[-1]:
        raise ValueError(f"top_k must be in 1..{router_logits.shape[-1]}, got {top_k}")
    if backend_for(router_logits.device) == "triton":
        from mlx_kernels import _moe_triton

        weights, experts = _moe_triton.route(router_logits.detach().contiguous(), top_k, renormalize)
        if torch.is_grad_enabled() and router_logits.requires_grad:
            # the kernel picks the experts; autograd needs the weights as a torch expression
            weights = _weights_of(router_logits, experts, renormalize)
        return weights, experts
    return moe_route_reference(router_logits, top_k, renormalize)


def sort_by_expert(experts: torch.Tensor, num_experts: int):
    """For ``experts [N, k]``: the order that groups the N*k (token, slot) pairs by expert
    (stable: within an expert, in token order), and the ``offsets [E + 1]`` (int64) of each
    expert's rows in that order. Shapes depend on N, k and E only (no host sync)."""
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    bounds = torch.arange(num_experts + 1, device=flat.device, dtype=flat.dtype)
    return order, torch.searchsorted(flat[order], bounds)


def row_experts(offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The expert of each of ``num_rows`` rows grouped by ``offsets [E + 1]`` (no host sync)."""
    return torch.searchsorted(offsets[1:], torch.arange(num_rows, device=offsets.device),
                              right=True)


def moe_grouped_matmul_reference(x, weights, offsets):
    if offsets.device.type == "cpu" and not torch.compiler.is_compiling():
        bounds = offsets.tolist()  # a CPU tensor: reading it syncs nothing
        parts = [F.linear(x[bounds[e]:bounds[e + 1]], weights[e])
                 for e in range(weights.shape[0]) if bounds[e + 1] > bounds[e]]
        return torch.cat(parts) if parts else x.new_zeros(x.shape[0], weights.shape[1])
    # shape-static: each expert over every row, each row keeping its own expert's output
    row_expert = row_experts(offsets, x.shape[0])
    out = x.new_zeros(x.shape[0], weights.shape[1])
    for e in range(weights.shape[0]):
        out = torch.where((row_expert == e)[:, None], F.linear(x, weights[e]), out)
    return out


class GroupedMatmulFunction(torch.autograd.Function):
    """The Triton grouped matmul, forward and backward: ``dx`` is the grouped matmul of ``dy``
    with each expert's weight transposed (a strided view, no copy), ``dW[e] = dy[rows]ᵀ x[rows]``
    one program per (expert, output tile, input tile). Gradients not asked for cost nothing."""

    @staticmethod
    def forward(ctx, x, weights, offsets):
        from mlx_kernels import _moe_triton

        ctx.save_for_backward(x, weights, offsets)
        return _moe_triton.grouped_matmul(x, weights, offsets)

    @staticmethod
    def backward(ctx, dy):
        from mlx_kernels import _moe_triton

        x, weights, offsets = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _moe_triton.grouped_matmul(dy, weights.transpose(1, 2), offsets)
        if ctx.needs_input_grad[1]:
            dw = _moe_triton.grouped_weight_grad(dy, x, offsets, weights.shape[0]).to(weights.dtype)
        return dx, dw, None


def moe_grouped_matmul(x: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x [M, in]`` (rows grouped by expert), ``weights [E, out, in]``, ``offsets [E + 1]``
    (int) -> ``[M, out]``; differentiable in ``x`` and ``weights``, with no host sync on CUDA."""
    if weights.dim() != 3 or weights.shape[2] != x.shape[1] or offsets.shape != (weights.shape[0] + 1,):
        raise ValueError(f"moe_grouped_matmul: x [M, in], weights [E, out, in], offsets [E + 1]; "
                         f"got {tuple(x.shape)}, {tuple(weights.shape)}, {tuple(offsets.shape)}")
    device_type = x.device.type
    if backend_for(x.device) == "triton":
        if torch.is_autocast_enabled(device_type):  # as autocast casts F.linear's operands
            dtype = torch.get_autocast_dtype(device_type)
            x, weights = x.to(dtype), weights.to(dtype)
        x = x.contiguous()
        if records_autograd(x, weights):
            return GroupedMatmulFunction.apply(x, weights, offsets)
        from mlx_kernels import _moe_triton

        return _moe_triton.grouped_matmul(x, weights, offsets)
    return moe_grouped_matmul_reference(x, weights, offsets)
