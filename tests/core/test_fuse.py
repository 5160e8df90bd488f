"""``mlx_core.transforms.fuse_projections``: q/k/v and gate/up as one GEMM each.

Stacking rows computes what the separate layers did: the logits equal the unfused model's to
fp32 rounding (1e-5 of their scale; the quantized schemes quantize each row on its own, so their
layers compute the same values). The state dict, saving and loading keep the zoo's names, and
``unfuse_projections`` gives back the separate layers exactly."""

import copy

import pytest
import torch
from torch import nn

from mlx_core import build_model, generate, get_preset, load_model, save_model
from mlx_core.models.transformer import Attention, GatedMLP
from mlx_core.transforms import fuse_projections, quantize, unfuse_projections
from mlx_core.transforms.fuse import FusedAttention, FusedGatedMLP
from mlx_core.transforms.quantize import Int4Linear, Int8Linear

FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-olmo2", "tiny-gemma2", "tiny-gemma3",
            "tiny-gpt2", "tiny-mixtral"]


def _model(family, scheme=None):
    torch.manual_seed(0)
    model = build_model(get_preset(family)).eval()
    return quantize(model, scheme) if scheme else model


def _logits(model, ids):
    with torch.inference_mode():
        return model(ids)


def _both_kernel_paths(model, ids, monkeypatch):
    """The logits with the kernels' torch references (fp32 throughout), and with the CPU fast
    paths (the weight-only int8/int4 kernels there take bf16 activations)."""
    monkeypatch.setenv("MLX_KERNELS", "torch")
    references = _logits(model, ids)
    monkeypatch.delenv("MLX_KERNELS")
    return references, _logits(model, ids)


@pytest.mark.parametrize("scheme", [None, "int8", "int4", "w8a8"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_logits_and_state_equal_the_separate_layers(family, scheme, monkeypatch):
    model = _model(family, scheme)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    reference, fast_reference = _both_kernel_paths(model, ids, monkeypatch)
    state = copy.deepcopy(model.state_dict())
    fused = fuse_projections(model)
    gated = model.config.mlp_kind != "gelu" and not model.config.is_moe
    assert len(fused) == model.config.num_layers * (2 if gated else 1)
    attention = model.model.layers[0].self_attn
    assert type(attention) is FusedAttention and not hasattr(attention, "q_proj")
    assert attention.qkv_proj.out_features == sum(attention.fused_sizes)
    got, fast = _both_kernel_paths(model, ids, monkeypatch)
    scale = reference.abs().max().item()
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-5 * scale)
    # bf16 activations: the same values, rounded to bf16 after sums taken in another order
    bf16 = scheme in ("int8", "int4")
    torch.testing.assert_close(fast, fast_reference, rtol=0, atol=(1e-2 if bf16 else 1e-5) * scale)
    # the zoo's names on the way out, stacked again on the way in
    again = model.state_dict()
    assert list(again) == list(state) or set(again) == set(state)
    assert all(torch.equal(again[k], state[k]) for k in state)
    model.load_state_dict(state)
    torch.testing.assert_close(_logits(model, ids), fast, rtol=0, atol=0)


def test_unfuse_gives_back_the_zoo_layers_and_only_those_asked_for():
    model = _model("tiny-llama", "int4")
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    reference = _logits(model, ids)
    fuse_projections(model)
    assert unfuse_projections(model, {"model.layers.1.mlp"}) == ["model.layers.1.mlp"]
    layers = model.model.layers
    assert type(layers[1].mlp) is GatedMLP and type(layers[1].mlp.gate_proj) is Int4Linear
    assert type(layers[1].self_attn) is FusedAttention and type(layers[0].mlp) is FusedGatedMLP
    assert len(unfuse_projections(model)) == 3
    assert all(type(layer.self_attn) is Attention for layer in layers)
    assert "model.layers.0.self_attn.qkv_proj.qweight" not in model.state_dict()
    torch.testing.assert_close(_logits(model, ids), reference, rtol=0, atol=0)


def test_layers_that_cannot_be_stacked_stay_separate():
    """A GGUF Q4_K_M file ships attn_v in Q6_K (int8 here) beside Q4_K q/k (int4)."""
    model = _model("tiny-llama", "int4")
    attention = model.model.layers[0].self_attn
    attention.v_proj = Int8Linear.from_linear(attention.v_proj.dequantized())
    fused = fuse_projections(model)
    assert "model.layers.0.self_attn" not in fused and "model.layers.1.self_attn" in fused
    assert type(attention) is Attention and type(model.model.layers[0].mlp) is FusedGatedMLP


def test_a_fused_model_saves_and_loads_as_the_zoo_model(tmp_path):
    model = _model("tiny-qwen2")
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    reference = _logits(model, ids)
    fuse_projections(model)
    save_model(model, tmp_path / "saved")
    loaded = load_model(tmp_path / "saved")
    assert type(loaded.model.layers[0].self_attn) is Attention
    torch.testing.assert_close(_logits(loaded, ids), reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scheme", [None, "int4", "w8a8"])
def test_compiled_decoding_of_a_fused_model_equals_eager_decoding(scheme):
    model = _model("tiny-llama", scheme)
    prompt = torch.randint(3, model.config.vocab_size, (9,)).tolist()
    eager = generate(model, prompt, max_new_tokens=8, stop_token_ids=[])
    fuse_projections(model)
    assert generate(model, prompt, max_new_tokens=8, stop_token_ids=[], compile=True) == eager


def test_fused_mlp_outputs_keep_the_uncopied_layout():
    """The stacked gate/up weight's transposed GEMM output splits into two halves of one dense
    layout (the form the native activation kernel reads without a copy)."""
    from mlx_core.transforms import uncopied_mlp_outputs

    model = uncopied_mlp_outputs(_model("tiny-llama"))
    fuse_projections(model)
    mlp = model.model.layers[0].mlp
    assert mlp.gate_up_proj.contiguous_output is False
    with torch.inference_mode():
        gate, up = mlp.project(torch.randn(1, 4, model.config.hidden_size))
    assert gate.stride() == up.stride() and isinstance(mlp.gate_up_proj, nn.Linear)
