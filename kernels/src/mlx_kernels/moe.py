"""Mixture-of-experts: top-k softmax routing and the grouped expert matmul.

Routing follows Mixtral: softmax over all experts (fp32), keep the top ``k``, renormalise them
to sum to one. The grouped matmul multiplies rows already sorted by expert with that expert's
weight: ``out[i] = x[i] @ weights[e]ᵀ`` for rows ``offsets[e] <= i < offsets[e + 1]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlx_kernels.dispatch import backend_for


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
    """For ``experts [N, k]``: the order that groups the N*k (token, slot) pairs by expert, and
    the ``offsets [E + 1]`` of each expert's rows in that order."""
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = F.pad(counts.cumsum(0), (1, 0))
    return order, offsets


def moe_grouped_matmul_reference(x, weights, offsets):
    out = x.new_empty(x.shape[0], weights.shape[1])
    bounds = offsets.tolist()
    for e in range(weights.shape[0]):
        if bounds[e + 1] > bounds[e]:
            out[bounds[e]:bounds[e + 1]] = F.linear(x[bounds[e]:bounds[e + 1]], weights[e])
    return out


def moe_grouped_matmul(x: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x [M, in]`` (rows grouped by expert), ``weights [E, out, in]``, ``offsets [E + 1]``
    (int) -> ``[M, out]``. Inference only."""
    if weights.dim() != 3 or weights.shape[2] != x.shape[1] or offsets.shape != (weights.shape[0] + 1,):
        raise ValueError(f"moe_grouped_matmul: x [M, in], weights [E, out, in], offsets [E + 1]; "
                         f"got {tuple(x.shape)}, {tuple(weights.shape)}, {tuple(offsets.shape)}")
    if backend_for(x.device) == "triton":
        from mlx_kernels import _moe_triton

        return _moe_triton.grouped_matmul(x.contiguous(), weights.contiguous(), offsets.contiguous())
    return moe_grouped_matmul_reference(x, weights, offsets)
