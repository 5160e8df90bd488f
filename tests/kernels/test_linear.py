"""mlx_kernels.linear: F.linear, with the GEMM transposed for small-batch CPU inference."""

import types

import pytest
import torch
import torch.nn.functional as F

from mlx_kernels import linear


def _linear_module():
    """The module (``mlx_kernels.linear`` as an attribute is the op)."""
    import importlib

    return importlib.import_module("mlx_kernels.linear")


@pytest.mark.parametrize("rows", [1, 7, 8, 24, 48, 49, 130])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_f_linear_at_every_batch_size(rows, bias):
    torch.manual_seed(rows)
    x, w = torch.randn(1, rows, 96), torch.randn(40, 96)
    b = torch.randn(40) if bias else None
    with torch.inference_mode():
        got = linear(x, w, b)
    assert got.shape == (1, rows, 40) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-5, rtol=1e-5)  # fp32 rounding


def test_small_batches_take_the_transposed_gemm_only_in_inference(monkeypatch):
    module = _linear_module()
    calls = []
    monkeypatch.setattr(module, "F", types.SimpleNamespace(
        linear=lambda *a: calls.append("F.linear") or F.linear(*a)))
    x, w = torch.randn(24, 32), torch.randn(16, 32, requires_grad=True)
    with torch.no_grad():
        linear(x, w)
    assert calls == []  # the transposed GEMM
    linear(x[:4], w)
    y = linear(x, w)  # autograd on: the plain op, and gradients flow
    y.sum().backward()
    assert calls == ["F.linear", "F.linear"] and w.grad is not None
    with torch.no_grad():
        linear(x.bfloat16(), w.bfloat16())
        monkeypatch.setenv("MLX_KERNELS", "torch")
        assert torch.equal(linear(x, w), F.linear(x, w))
    assert calls == ["F.linear"] * 4


def test_zoo_layers_use_it_and_keep_nn_linear_names():
    from mlx_core import build_model, get_preset
    from mlx_core.models.linear import Linear

    model = build_model(get_preset("tiny-llama"))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Linear) and isinstance(q_proj, torch.nn.Linear)
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()
    x = torch.randn(2, 5, q_proj.in_features)  # 10 rows: the transposed GEMM
    with torch.inference_mode():
        torch.testing.assert_close(q_proj(x), F.linear(x, q_proj.weight, q_proj.bias))


def test_compiles_with_dynamic_shapes():
    """Under torch.compile(dynamic=True) the row count is symbolic: the layout choice must trace."""
    compiled = torch.compile(linear, dynamic=True)
    w = torch.randn(16, 32)
    with torch.inference_mode():
        for rows in (10, 20, 60):
            x = torch.randn(rows, 32)
            torch.testing.assert_close(compiled(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [4, 24, 64])
def test_uncopied_output_is_the_same_values_and_feeds_the_next_linear(rows):
    """``contiguous=False``: the transposed GEMM's result comes out as a transposed view (no
    copy), which an activation and the next linear read as they are."""
    torch.manual_seed(rows)
    x, w_up, w_down = torch.randn(1, rows, 96), torch.randn(160, 96), torch.randn(96, 160)
    bias = torch.randn(160)
    with torch.inference_mode():
        up = linear(x, w_up, bias, contiguous=False)
        if 8 <= rows <= 48:  # the transposed GEMM
            assert up.stride()[1:] == (1, rows) and not up.is_contiguous()
        else:
            assert up.is_contiguous()
        torch.testing.assert_close(up, F.linear(x, w_up, bias), atol=1e-5, rtol=1e-5)
        down = linear(F.silu(up), w_down)
        assert down.is_contiguous()
        want = F.linear(F.silu(F.linear(x, w_up, bias)), w_down)
        torch.testing.assert_close(down, want, atol=1e-4, rtol=1e-5)


def test_zoo_mlps_let_the_gate_and_up_outputs_out_uncopied():
    from mlx_core import build_model, get_preset

    for preset in ("tiny-llama", "tiny-gpt2"):
        model = build_model(get_preset(preset)).eval()
        mlp = model.model.layers[0].mlp
        uncopied = [p for p in ("gate_proj", "up_proj") if hasattr(mlp, p)]
        assert uncopied and all(not getattr(mlp, p).contiguous_output for p in uncopied)
        assert mlp.down_proj.contiguous_output and model.model.layers[0].self_attn.q_proj.contiguous_output
        x = torch.randn(1, 24, mlp.down_proj.out_features)
        with torch.inference_mode():
            got = mlp(x)
        with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLX_KERNELS", "torch")  # plain F.linear everywhere
            want = mlp(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
