"""The zoo's sparse MoE (``mlx_core.models.moe``): routed through the grouped expert matmul, it
computes what running each expert on its own tokens computes (outputs and every gradient,
fp32: 1e-5), on the torch references and the Triton kernels; its inference stack of expert
weights is the experts' own storage and follows their changes; experts that are not plain
linear layers run one by one to the same result. DeepSeek's routings (``moe_routing``) choose
and weigh as HF transformers' routers do; its shared experts add to the routed output."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mlx_core import build_model, get_preset
from mlx_core.models.moe import SparseMoE
from mlx_core.models.moe_routing import Routing

PRESETS = ["tiny-mixtral", "tiny-qwen3-moe"]


def _moe(preset, **changes):
    torch.manual_seed(0)
    model = build_model(get_preset(preset).replace(**changes))
    return next(m for m in model.modules() if isinstance(m, SparseMoE))


def _per_expert(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """The loop the routed form replaced: each chosen expert on its tokens, weighted, summed."""
    flat = x.reshape(-1, x.shape[-1])
    if moe.routing.plain:
        probs = torch.softmax(F.linear(flat, moe.gate.weight).float(), dim=-1)
        weights, chosen = torch.topk(probs, moe.top_k, dim=-1)
        if moe.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
    else:  # DeepSeek's routings: checked against HF's routers below
        weights, chosen = moe.routing(F.linear(flat, moe.gate.weight), moe._correction_bias())
    out = torch.zeros_like(flat)
    for e, expert in enumerate(moe.experts):
        token, slot = torch.where(chosen == e)
        gate, up, down = (layer.weight for layer in expert.projections())
        y = F.linear(F.silu(F.linear(flat[token], gate)) * F.linear(flat[token], up), down)
        out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
    if hasattr(moe, "shared_experts"):
        gate, up, down = (layer.weight for layer in moe.shared_experts.projections())
        out = out + F.linear(F.silu(F.linear(flat, gate)) * F.linear(flat, up), down)
    return out.reshape(x.shape)


def _outputs_and_grads(moe, fn, x, grad):
    moe.zero_grad()
    x = x.clone().requires_grad_()
    out = fn(x)
    out.backward(grad)
    return [out.detach(), x.grad] + [p.grad.clone() for _, p in sorted(moe.named_parameters())]


@pytest.mark.parametrize("preset,changes", [("tiny-mixtral", {}), ("tiny-qwen3-moe", {}),
                                            ("tiny-qwen3-moe", {"norm_topk_prob": False}),
                                            ("tiny-deepseek-v2", {}), ("tiny-deepseek-v3", {})],
                         ids=["mixtral", "qwen3-moe", "qwen3-moe-unnormalised", "deepseek-v2",
                              "deepseek-v3"])
def test_routed_experts_equal_each_expert_on_its_tokens(preset, changes):
    moe = _moe(preset, **changes)
    x, grad = torch.randn(3, 11, 64), torch.randn(3, 11, 64)
    got = _outputs_and_grads(moe, moe, x, grad)
    want = _outputs_and_grads(moe, lambda x: _per_expert(moe, x), x, grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():  # the stacked (no autograd) form
        torch.testing.assert_close(moe(x), want[0], atol=1e-5, rtol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("preset", PRESETS)
def test_triton_kernels_give_the_references_outputs_and_gradients(preset, monkeypatch):
    moe = _moe(preset)
    x, grad = torch.randn(2, 9, 64), torch.randn(2, 9, 64)
    want = _outputs_and_grads(moe, moe, x, grad)
    monkeypatch.setenv("MLX_KERNELS", "triton")
    got = _outputs_and_grads(moe, moe, x, grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_inference_stack_is_the_experts_storage():
    with torch.inference_mode(False):
        moe = _moe("tiny-mixtral")
    x = torch.randn(2, 5, 64)
    before = moe(x)
    gate_up, down = moe._stacks.tensors
    expert = moe.experts[2]
    assert expert.w1.weight.data_ptr() == gate_up[2].data_ptr()  # views, not a second copy
    assert expert.w3.weight.data_ptr() == gate_up[2, 96:].data_ptr()
    assert expert.w2.weight.data_ptr() == down[2].data_ptr()
    with torch.no_grad():  # an in-place update (load_state_dict, an optimizer step) shows
        moe.load_state_dict({k: v * 2 if "experts.1." in k else v for k, v in moe.state_dict().items()})
    assert moe._stacks.tensors is None or moe._stacks.tensors[0] is gate_up
    changed = moe(x)
    assert (changed - before).abs().max() > 1e-3
    torch.testing.assert_close(changed, _per_expert(moe, x), atol=1e-5, rtol=1e-5)
    with torch.inference_mode(False):  # a new tensor: stacked again
        expert.w2.weight = nn.Parameter(expert.w2.weight * 0.5)
    torch.testing.assert_close(moe(x), _per_expert(moe, x), atol=1e-5, rtol=1e-5)
    assert expert.w2.weight.data_ptr() == moe._stacks.tensors[1][2].data_ptr()
    expert.w2.weight = nn.Parameter(expert.w2.weight * 2)  # made in inference mode: not stacked
    torch.testing.assert_close(moe(x), _per_expert(moe, x), atol=1e-5, rtol=1e-5)
    made_here = _moe("tiny-mixtral")  # every parameter made in inference mode
    torch.testing.assert_close(made_here(x), _per_expert(made_here, x), atol=1e-5, rtol=1e-5)
    assert made_here.experts[0].w1.weight.data_ptr() == made_here._stacks.tensors[0][0].data_ptr()
    wide = copy.deepcopy(moe).to(torch.float64)  # a copy with its own parameters and stack
    torch.testing.assert_close(wide(x.double()).float(), moe(x), atol=1e-5, rtol=1e-5)
    assert wide._stacks.tensors[0].dtype == torch.float64


class _Wrapped(nn.Module):
    """A linear layer behind another module, as an adapter wraps it."""

    def __init__(self, linear):
        super().__init__()
        self.base = linear

    def forward(self, x):
        return self.base(x)


@pytest.mark.parametrize("preset", PRESETS)
def test_other_expert_layers_run_one_by_one(preset):
    moe = _moe(preset)
    x = torch.randn(2, 7, 64)
    with torch.inference_mode():
        want = moe(x)
    first = moe.experts[0]
    setattr(first, first.names[0], _Wrapped(first.projections()[0]))
    with torch.inference_mode():
        assert moe._stacked_weights() is None and moe._stacks.tensors is None
        torch.testing.assert_close(moe(x), want, atol=1e-5, rtol=1e-5)
    compiled = torch.compile(moe, fullgraph=True, dynamic=False)  # every expert over every row
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), want, atol=1e-5, rtol=1e-5)


_DEEPSEEK_ROUTERS = {  # (HF version, HF config changes)
    "v2-greedy": ("V2", dict(topk_method="greedy", routed_scaling_factor=1.5)),
    "v2-group-limited": ("V2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2)),
    "v3-noaux-tc": ("V3", dict(n_group=4, topk_group=2, routed_scaling_factor=2.5)),
    "v3-noaux-tc-unnormalised": ("V3", dict(n_group=2, topk_group=1, norm_topk_prob=False)),
}


@pytest.mark.parametrize("name", sorted(_DEEPSEEK_ROUTERS))
@torch.no_grad()
def test_deepseek_routing_chooses_and_weighs_as_hf(name):
    """The same experts with the same weights as HF's DeepSeek routers (8 experts, 3 per token),
    for every token of a batch; V3's correction bias moves the choice, not the weights."""
    import transformers
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as v2
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as v3

    version, changes = _DEEPSEEK_ROUTERS[name]
    config = getattr(transformers, f"Deepseek{version}Config")(
        hidden_size=16, num_attention_heads=2, n_routed_experts=8, num_experts_per_tok=3,
        **changes)
    hf = (v2.DeepseekV2TopkRouter if version == "V2" else v3.DeepseekV3TopkRouter)(config)
    torch.manual_seed(0)
    hf.weight.normal_()
    ours = SparseMoE(_zoo_config(config))
    ours.gate.weight.copy_(hf.weight)
    if version == "V3":
        hf.e_score_correction_bias.normal_(0.0, 0.5)
        ours.gate.e_score_correction_bias.copy_(hf.e_score_correction_bias)
    x = torch.randn(64, 16)
    _, want_weights, want_experts = hf(x)
    weights, experts = ours.routing(ours.gate(x), ours._correction_bias())
    order, want_order = experts.argsort(-1), want_experts.argsort(-1)
    assert torch.equal(experts.gather(1, order), want_experts.gather(1, want_order))
    torch.testing.assert_close(weights.gather(1, order), want_weights.gather(1, want_order))


def _zoo_config(hf_config):
    from mlx_core import ModelConfig

    hf = hf_config.to_dict()
    hf.update(num_hidden_layers=1, first_k_dense_replace=0, vocab_size=8)
    return ModelConfig.from_hf_config(hf)


def test_routing_plain_form_is_mixtrals():
    assert Routing(2, True).plain and not Routing(2, True, scaling=2.0).plain
