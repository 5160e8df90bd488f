import pytest
import torch
import torch.nn.functional as F

from mlx_kernels import moe_grouped_matmul, moe_route
from mlx_kernels.moe import moe_grouped_matmul_reference, moe_route_reference, sort_by_expert

from .conftest import DTYPES, assert_close, grads_of


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


def _grouped_inputs(rows=37, experts=6, top_k=2, empty=4):
    """Rows sorted by expert, expert ``empty`` given none."""
    torch.manual_seed(0)
    _, chosen = moe_route_reference(torch.randn(rows, experts), top_k)
    chosen[chosen == empty] = (empty + 1) % experts
    order, offsets = sort_by_expert(chosen, experts)
    return torch.randn(rows * top_k, 45)[order], torch.randn(experts, 70, 45), offsets


def test_sort_by_expert_groups_pairs_stably():
    chosen = torch.tensor([[2, 0], [0, 3], [2, 1]])
    order, offsets = sort_by_expert(chosen, 5)
    assert order.tolist() == [1, 2, 5, 0, 4, 3]  # expert 0: pairs 1, 2; expert 1: 5; ...
    assert offsets.tolist() == [0, 2, 3, 5, 6, 6]


def test_reference_forms_agree_and_match_autograd_per_expert():
    """The sliced form (CPU, eager) and the shape-static one (compiled, other devices) give the
    same outputs and gradients as per-expert F.linear under autograd."""
    x, w, offsets = _grouped_inputs()
    grad = torch.randn(x.shape[0], w.shape[1])

    def per_expert(x, w):
        bounds = offsets.tolist()
        return torch.cat([F.linear(x[bounds[e]:bounds[e + 1]], w[e]) for e in range(w.shape[0])])

    want, want_grads = grads_of(per_expert, [x, w], grad)
    static = torch.compile(moe_grouped_matmul_reference, fullgraph=True, dynamic=False)
    for fn in (moe_grouped_matmul_reference, static):
        got, got_grads = grads_of(lambda x, w, fn=fn: fn(x, w, offsets), [x, w], grad)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for g, wg in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, wg, atol=1e-5, rtol=1e-5)
    assert torch.equal(want_grads[1][4], torch.zeros(70, 45))  # the expert with no rows


@pytest.mark.triton
@pytest.mark.parametrize("dtype_tol", DTYPES)
def test_triton_grouped_matmul_gradients_match_reference(dtype_tol, monkeypatch):
    """Forward and backward (dx through the transposed weights, dW per expert, an expert with
    no rows) against torch autograd on the reference."""
    dtype, atol, rtol = dtype_tol
    x, w, offsets = _grouped_inputs()
    x, w = x.to(dtype), w.to(dtype)
    grad = torch.randn(x.shape[0], w.shape[1]).to(dtype)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MLX_KERNELS", backend)
        results[backend] = grads_of(lambda x, w: moe_grouped_matmul(x, w, offsets), [x, w], grad)
    (got, got_grads), (want, want_grads) = results["triton"], results["torch"]
    assert_close(got, want, atol, rtol)
    for g, wg in zip(got_grads, want_grads, strict=True):
        assert g.dtype == wg.dtype
        assert_close(g, wg, atol, rtol)
