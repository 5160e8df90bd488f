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


def test_uncopied_mlp_outputs_lets_the_gate_and_up_outputs_out_uncopied():
    """A transform: the zoo's modules carry no layout flag; the transform swaps the MLPs'
    gate/up projections for FastLinears over the same parameters."""
    from mlx_core import build_model, get_preset
    from mlx_core.transforms import FastLinear, uncopied_mlp_outputs

    for preset in ("tiny-llama", "tiny-gpt2"):
        model = build_model(get_preset(preset)).eval()
        assert not any(isinstance(m, FastLinear) for m in model.modules())
        keys = {k: v for k, v in model.state_dict().items()}
        assert uncopied_mlp_outputs(model) is model
        assert {k: v for k, v in model.state_dict().items()}.keys() == keys.keys()
        assert all(model.state_dict()[k] is v or torch.equal(model.state_dict()[k], v)
                   for k, v in keys.items())
        mlp = model.model.layers[0].mlp
        uncopied = [p for p in ("gate_proj", "up_proj") if hasattr(mlp, p)]
        assert uncopied and all(not getattr(mlp, p).contiguous_output for p in uncopied)
        assert not isinstance(mlp.down_proj, FastLinear)
        assert not isinstance(model.model.layers[0].self_attn.q_proj, FastLinear)
        x = torch.randn(1, 24, mlp.down_proj.out_features)
        with torch.inference_mode():
            got = mlp(x)
        with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLX_KERNELS", "torch")  # plain F.linear everywhere
            want = mlp(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _packed_module():
    module = _linear_module()
    if not module.packing_available():
        pytest.fail("this torch has no oneDNN (mkldnn): the packed CPU linear cannot run here")
    return module


@pytest.mark.parametrize("rows", [1, 4, 24, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_weight_equals_f_linear(rows, bias):
    module = _packed_module()
    torch.manual_seed(rows)
    x, w = torch.randn(2, rows, 96), torch.randn(40, 96)
    b = torch.randn(40) if bias else None
    packed = module.pack_weight(w)
    reads = []
    packed.for_weight = lambda weight: reads.append(weight) or module.PackedWeight.for_weight(packed, weight)
    with torch.inference_mode():
        got = linear(x, w, b, packed=packed, contiguous=False)
        strided = linear(x.transpose(0, 1), w, b, packed=packed)  # a non-contiguous input
    assert got.shape == (2, rows, 40) and got.is_contiguous() and len(reads) == 2
    torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-5, rtol=1e-5)  # fp32 rounding
    torch.testing.assert_close(strided, F.linear(x.transpose(0, 1), w, b), atol=1e-5, rtol=1e-5)


def test_packed_weight_follows_the_weight_and_stays_out_of_autograd(monkeypatch):
    """An in-place change or another tensor repacks before use; with autograd on, in another
    dtype or under MLX_KERNELS=torch the packed copy is not read."""
    module = _packed_module()
    w = torch.randn(16, 32)
    packed = module.pack_weight(w)
    x = torch.randn(5, 32)
    with torch.no_grad():
        before = packed.data
        w.mul_(2)  # e.g. load_state_dict, or an adapter merged into the weight
        torch.testing.assert_close(linear(x, w, packed=packed), F.linear(x, w), atol=1e-5, rtol=1e-5)
        assert packed.data is not before
        other = torch.randn(16, 32)
        torch.testing.assert_close(linear(x, other, packed=packed), F.linear(x, other),
                                   atol=1e-5, rtol=1e-5)
    calls = []
    monkeypatch.setattr(module.torch.ops, "mkldnn", types.SimpleNamespace(
        _linear_pointwise=lambda *a: calls.append(a) or pytest.fail("packed path taken")))
    trained = torch.randn(16, 32, requires_grad=True)
    linear(x, trained, packed=packed).sum().backward()
    assert trained.grad is not None
    with torch.no_grad():
        linear(x.double(), w.double(), packed=packed)
        monkeypatch.setenv("MLX_KERNELS", "torch")
        assert torch.equal(linear(x, w, packed=packed), F.linear(x, w))
    assert calls == []


def test_pack_weight_only_where_the_packed_path_runs():
    module = _packed_module()
    assert module.pack_weight(torch.randn(8, 4)) is not None
    assert module.pack_weight(torch.randn(8, 4, dtype=torch.bfloat16)) is None
    assert module.pack_weight(torch.randn(8, 4, 2)) is None


def test_prepacked_zoo_model_gives_the_same_logits_and_checkpoint():
    import copy

    from mlx_core import build_model, get_preset, prepack_linear_weights
    from mlx_core.transforms import FastLinear

    _packed_module()
    model = build_model(get_preset("tiny-llama")).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    keys = set(model.state_dict())
    with torch.inference_mode():
        want = model(ids)
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        weights = sum(m.weight.numel() * 4 for m in linears)
        assert prepack_linear_weights(model, calibrate=False) == weights
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert all(isinstance(m, FastLinear) and m.packed_weight is not None for m in linears)
        assert model.lm_head.weight is model.model.embed_tokens.weight or \
            not model.config.tie_word_embeddings
        assert prepack_linear_weights(model, calibrate=False) == 0  # packed already
        torch.testing.assert_close(model(ids), want, atol=1e-4, rtol=1e-4)  # fp32 rounding
        twin = copy.deepcopy(model)  # the copy packs its own weights on first use
        torch.testing.assert_close(twin(ids), want, atol=1e-4, rtol=1e-4)
    assert set(model.state_dict()) == keys
    bf16 = build_model(get_preset("tiny-llama")).to(torch.bfloat16)
    assert prepack_linear_weights(bf16, calibrate=False) == 0


def test_prepacking_keeps_linear_subclasses_with_a_forward_of_their_own():
    # a DeepSeek-V3 router carries its correction bias, a vocab-parallel head gathers its shares:
    # swapping either for a FastLinear would drop that (found by tensor-parallel serving)
    from mlx_core import build_model, get_preset, prepack_linear_weights
    from mlx_core.models.moe import Router

    _packed_module()
    model = build_model(get_preset("tiny-deepseek-v3")).eval()
    prepack_linear_weights(model, calibrate=False)
    routers = [m for m in model.modules() if isinstance(m, Router)]
    assert routers and all(type(m) is Router and m.e_score_correction_bias is not None
                           for m in routers)


def test_calibrated_prepacking_packs_the_shapes_that_measure_faster(monkeypatch):
    from mlx_core import build_model, get_preset, prepack_linear_weights
    from mlx_core.transforms import fast_linear as zoo_linear

    module = _packed_module()
    assert module.packing_pays_off(torch.randn(64, 32), rows=(2, 9), repeats=1) in (True, False)
    timed = []

    def square_only(weight):  # the decision, one timing per shape
        timed.append(tuple(weight.shape))
        return weight.shape[0] == weight.shape[1]

    monkeypatch.setattr(zoo_linear, "packing_pays_off", square_only)
    model = build_model(get_preset("tiny-llama")).eval()
    packed_bytes = prepack_linear_weights(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    square = [m for m in linears if m.in_features == m.out_features]
    assert square and len(square) < len(linears) and len(timed) == len(set(timed))
    assert all((getattr(m, "packed_weight", None) is not None) == (m in square) for m in linears)
    assert packed_bytes == sum(m.weight.numel() * 4 for m in square)
