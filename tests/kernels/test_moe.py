import pytest
import torch
import torch.nn.functional as F

from mlx_kernels import moe_grouped_matmul, moe_route
from mlx_kernels.moe import moe_grouped_matmul_reference, moe_route_reference, sort_by_expert


@pytest.mark.triton
@pytest.mark.parametrize("experts,top_k", [(6, 2), (8, 1), (5, 3)])
def test_triton_routing_matches_reference(experts, top_k, triton_backend):
    torch.manual_seed(0)
    logits = torch.randn(37, experts)
    weights, chosen = moe_route(logits, top_k)
    ref_weights, ref_chosen = moe_route_reference(logits, top_k)
    assert torch.equal(chosen, ref_chosen)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-6)


def test_reference_routing_is_mixtrals():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    torch.manual_seed(0)
    router = MixtralTopKRouter(MixtralConfig(hidden_size=16, num_local_experts=6, num_experts_per_tok=2))
    torch.nn.init.normal_(router.weight)
    x = torch.randn(11, 16)
    _, hf_weights, hf_experts = router(x)
    weights, experts = moe_route_reference(F.linear(x, router.weight), 2)
    assert torch.equal(experts, hf_experts)
    torch.testing.assert_close(weights, hf_weights)


@pytest.mark.triton
def test_triton_grouped_matmul_matches_reference(triton_backend):
    torch.manual_seed(0)
    _, chosen = moe_route_reference(torch.randn(37, 6), 2)
    order, offsets = sort_by_expert(chosen, 6)
    x = torch.randn(74, 45)[order]
    weights = torch.randn(6, 70, 45)
    got = moe_grouped_matmul(x, weights, offsets)
    want = moe_grouped_matmul_reference(x, weights, offsets)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    row = int(offsets[3])  # first row of expert 3
    torch.testing.assert_close(want[row], weights[3] @ x[row])


@pytest.mark.triton
def test_routing_weights_are_differentiable_on_both_backends(monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(9, 6)
    grads = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MLX_KERNELS", backend)
        leaf = logits.clone().requires_grad_()
        weights, _ = moe_route(leaf, 2)
        (weights * torch.arange(2.0)).sum().backward()
        grads[backend] = leaf.grad
    torch.testing.assert_close(grads["triton"], grads["torch"])
    assert grads["torch"].abs().sum() > 0
