"""``mlx_core.quantize`` / ``load_model(quantization=...)``: the transform on every zoo family.

The reference for a quantized model is the same model in fp32 with each linear weight replaced
by its dequantized value (and the embedding by its dequantized table): under MLX_KERNELS=torch
the quantized model computes exactly that (1e-5); with the CPU fast paths (bf16 activations in
the weight-only kernels, int8 activations in W8A8) it stays within 2% of the logits' scale.
"""

import copy

import pytest
import torch
from torch import nn

import mlx_core
from mlx_core import build_model, generate, get_preset, load_model
from mlx_core.models.moe import Router
from mlx_core.transforms import (
    Int4Linear,
    Int8Linear,
    QuantizedEmbedding,
    W8A8Linear,
    parse_scheme,
    quantize,
)
from mlx_kernels import quantized_linear as ql

FAMILIES = ["tiny-llama", "tiny-gpt2", "tiny-mixtral", "tiny-qwen3-moe", "tiny-qwen2", "tiny-qwen3", "tiny-olmo2", "tiny-mistral", "tiny-gemma3", "tiny-gemma2"]
KINDS = {"int8": Int8Linear, "int4": Int4Linear, "w8a8": W8A8Linear}


def _model(family):
    torch.manual_seed(0)
    return build_model(get_preset(family)).eval()


def _dequantized_twin(fp32: nn.Module, quantized: nn.Module) -> nn.Module:
    """``fp32`` with every quantized weight replaced by its dequantized value."""
    twin = copy.deepcopy(fp32)
    modules = dict(quantized.named_modules())
    with torch.no_grad():
        for name, layer in twin.named_modules():
            q = modules.get(name)
            if isinstance(layer, nn.Linear) and hasattr(q, "dequantized_weight"):
                layer.weight = nn.Parameter(q.dequantized_weight())
        twin.model.embed_tokens.weight.copy_(quantized.model.embed_tokens.dequantized_weight())
    return twin


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", ["int8", "int4", "w8a8"])
def test_quantized_logits_equal_the_dequantized_reference(family, scheme, monkeypatch):
    fp32 = _model(family)
    model = quantize(copy.deepcopy(fp32), scheme)
    assert model.quantization == scheme
    linears = [m for n, m in model.named_modules() if isinstance(m, KINDS[scheme])]
    assert type(model.lm_head) is (W8A8Linear if scheme == "w8a8" else Int8Linear)
    assert linears and not any(type(m) is nn.Linear or type(m).__name__ == "Linear"
                               for n, m in model.named_modules()
                               if not n.endswith(("moe.gate", "mlp.gate")))  # MoE routers
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    ids = torch.randint(0, fp32.config.vocab_size, (2, 11))
    twin = _dequantized_twin(fp32, model)
    with torch.inference_mode():
        fast = model(ids)
        if scheme != "w8a8":  # W8A8 also quantizes activations: no fp32 twin computes that
            monkeypatch.setenv("MLX_KERNELS", "torch")
            torch.testing.assert_close(model(ids), twin(ids), atol=1e-5, rtol=1e-5)
            monkeypatch.delenv("MLX_KERNELS")
        want = twin(ids)
    assert (fast - want).abs().max() <= 0.02 * want.abs().max()
    # and the quantization error against fp32 itself stays small on these random models
    with torch.inference_mode():
        full = fp32(ids)
    budget = {"int8": 0.03, "w8a8": 0.05, "int4": 0.25}[scheme]
    assert (fast - full).abs().max() <= budget * full.abs().max()


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-mixtral"])
def test_w7a8_narrows_every_weight_but_the_mlp_outputs_and_the_head(family, monkeypatch):
    """W7A8: W8A8 layers whose weights lie within +-64 (each layer's own scale), but the MLP's
    output projections (down_proj; Mixtral's experts' w2) and the head keep the full range. On
    a CPU without VNNI the narrow weights run the narrow GEMM: the same logits, bit for bit, as
    with every layer on the full-range one."""
    fp32 = _model(family)
    model = quantize(copy.deepcopy(fp32), "w7a8")
    assert model.quantization == "w7a8"
    ranges = {name: int(m.qweight.abs().max()) for name, m in model.named_modules()
              if isinstance(m, W8A8Linear)}
    wide = {name for name in ranges if name.endswith(("down_proj", "w2")) or name == "lm_head"}
    assert wide and len(ranges) > len(wide)
    assert all(ranges[name] <= ql.NARROW_QMAX for name in set(ranges) - wide)
    assert all(ranges[name] > ql.NARROW_QMAX for name in wide)  # random weights use the range
    ids = torch.randint(0, fp32.config.vocab_size, (2, 11))
    narrow_calls = []
    offsets = ql.narrow_offsets
    monkeypatch.setattr(ql, "narrow_offsets",
                        lambda q: narrow_calls.append(offsets(q)) or narrow_calls[-1])
    with torch.inference_mode():
        got = copy.deepcopy(model)(ids)
        monkeypatch.setattr(ql, "narrow_offsets", lambda q: None)
        wide_only = copy.deepcopy(model)(ids)
        full = fp32(ids)
    if ql._w8a8_gemm_native():  # AVX2 without VNNI: the narrow GEMM ran
        assert any(o is not None for o in narrow_calls)
    assert torch.equal(got, wide_only)
    assert (got - full).abs().max() <= 0.08 * full.abs().max()


def test_moe_routers_stay_full_precision():
    model = quantize(_model("tiny-mixtral"), "int8")
    for layer in model.model.layers:
        assert type(layer.block_sparse_moe.gate) is Router  # the zoo's full-precision router
        assert isinstance(layer.block_sparse_moe.experts[0].w1, Int8Linear)
    qwen3_moe = quantize(_model("tiny-qwen3-moe"), "int8").model.layers
    assert type(qwen3_moe[0].mlp.gate) is Router  # the router of the sparse layer
    assert isinstance(qwen3_moe[0].mlp.experts[0].gate_proj, Int8Linear)
    assert isinstance(qwen3_moe[1].mlp.gate_proj, Int8Linear)  # the dense layer's MLP


def test_tied_head_and_embedding_share_one_int8_copy():
    model = quantize(_model("tiny-qwen2"), "int8")
    assert model.config.tie_word_embeddings
    assert model.lm_head.qweight is model.model.embed_tokens.qweight
    int4 = quantize(_model("tiny-qwen2"), "int4")  # the head stays int8 (as llama.cpp's mixes)
    assert type(int4.lm_head) is Int8Linear
    assert int4.lm_head.qweight is int4.model.embed_tokens.qweight
    untied = quantize(_model("tiny-llama"), "int8")
    assert untied.lm_head.qweight is not untied.model.embed_tokens.qweight


def test_quantized_weights_are_buffers_in_the_state_dict():
    model = quantize(_model("tiny-llama"), "int4")
    assert not list(model.parameters())[0].dtype == torch.uint8
    state = model.state_dict()
    assert state["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.uint8
    assert "model.layers.0.self_attn.q_proj.scales" in state
    assert all(p.dtype == torch.float32 for p in model.parameters())  # only the norms are left


def test_generate_runs_on_every_scheme_and_greedy_int8_follows_fp32():
    fp32 = _model("tiny-llama")
    prompt = [1, 5, 9, 3, 7]
    want = generate(fp32, prompt, max_new_tokens=8, stop_token_ids=[])
    for scheme in ("int8", "int4", "w8a8"):
        got = generate(quantize(copy.deepcopy(fp32), scheme), prompt, max_new_tokens=8,
                       stop_token_ids=[])
        assert len(got) == 8
        if scheme == "int8":
            assert got[:4] == want[:4]


def test_load_model_quantizes_and_bad_schemes_fail_before_loading(tiny_model_dir, monkeypatch):
    model = load_model(tiny_model_dir, quantization="int4")
    assert model.quantization == "int4"
    assert model.model.layers[0].self_attn.q_proj.group_size == 32
    assert not model.training
    import mlx_core.models.loading as loading

    monkeypatch.setattr(loading, "read_safetensors", lambda *_: pytest.fail("read weights"))
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'; choose one of int8, "
                                         "int4, int4-g32, int4-g64, int4-g128, w8a8"):
        load_model(tiny_model_dir, quantization="int3")


def test_scheme_spellings_and_errors():
    assert str(parse_scheme(" W7A8")) == "w7a8" and parse_scheme("w7a8").name == "w8a8"
    assert parse_scheme("w7a8").narrow and not parse_scheme("w8a8").narrow
    with pytest.raises(ValueError, match=r"group_size applies to int4 only \(w7a8"):
        parse_scheme("w7a8", group_size=64)
    assert str(parse_scheme("INT4")) == "int4" and parse_scheme("int4").group_size == 32
    assert parse_scheme("int4", group_size=128).group_size == 128
    assert str(parse_scheme("int4-g128")) == "int4-g128"
    with pytest.raises(ValueError, match="group_size applies to int4 only"):
        parse_scheme("int8", group_size=64)
    with pytest.raises(ValueError, match="disagree"):
        parse_scheme("int4-g64", group_size=32)
    with pytest.raises(ValueError, match="choose one of 32, 64, 128"):
        parse_scheme("int4-g16")


def test_a_group_size_that_does_not_divide_a_layer_is_named_before_any_work():
    model = _model("tiny-llama")  # intermediate 96: down_proj's inputs do not split into 64s
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"96 input features of model\.layers\.0\.mlp\.down_proj; "
                                         "choose 32"):
        quantize(model, "int4-g64")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model, "quantization")


def test_quantizing_twice_is_refused():
    model = quantize(_model("tiny-llama"), "int8")
    with pytest.raises(ValueError, match="quantized already"):
        mlx_core.quantize(model, "int4")


def test_training_loss_runs_on_a_quantized_base():
    """Autograd takes the reference paths; the loss equals the dequantized twin's."""
    fp32 = _model("tiny-llama")
    model = quantize(copy.deepcopy(fp32), "int4")
    twin = _dequantized_twin(fp32, model)
    ids = torch.randint(0, fp32.config.vocab_size, (2, 9))
    torch.testing.assert_close(model(ids, labels=ids), twin(ids, labels=ids))


def test_cli_generate_and_chat_take_quantization(tiny_model_dir):
    from typer.testing import CliRunner

    from mlx_core import load_tokenizer
    from mlx_core.cli.app import build_app

    tokenizer = load_tokenizer(tiny_model_dir)
    ids = generate(load_model(tiny_model_dir, quantization="w8a8"), tokenizer.encode("hello there"),
                   max_new_tokens=5, stop_token_ids=tokenizer.eos_token_ids)
    runner = CliRunner()
    done = runner.invoke(build_app(), ["generate", "-m", str(tiny_model_dir), "-p", "hello there",
                                       "-n", "5", "--no-chat", "--quantization", "w8a8"])
    assert done.exit_code == 0, done.output
    assert done.output == tokenizer.decode(ids) + "\n"
    bad = runner.invoke(build_app(), ["chat", "-m", str(tiny_model_dir), "-q", "int2"], input="hi\n")
    assert bad.exit_code == 1 and "unknown quantization scheme 'int2'" in bad.output
    jax = runner.invoke(build_app(), ["generate", "-m", str(tiny_model_dir), "-p", "hi", "-q",
                                      "int8", "--backend", "jax"])
    assert jax.exit_code == 1 and "torch backend only" in jax.output


def test_bench_quant_reports_ratios_against_fp32(tiny_model_dir, tmp_path):
    """The bench's bookkeeping on a tiny model (its figures are measured on the built-in one)."""
    import json

    from typer.testing import CliRunner

    from mlx_core.cli.app import build_app
    from mlx_core.transforms import bench

    out = tmp_path / "quant.json"
    done = CliRunner().invoke(build_app(), ["bench", "quant", "-m", str(tiny_model_dir),
                                            "--prompt-len", "8", "--new-tokens", "4", "--rounds",
                                            "1", "--json", str(out)])
    assert done.exit_code == 0, done.output
    result = json.loads(out.read_text())
    rows = result["schemes"]
    assert set(rows) == {"fp32", "int8", "int4", "w8a8", "w7a8"} and rows["fp32"]["decode_ratio"] == 1.0
    assert all(row["decode_tokens_per_s"] > 0 for row in rows.values())
    fp32 = load_model(tiny_model_dir)
    assert rows["fp32"]["weight_mib"] == round(bench.weight_bytes(fp32) / 2**20, 1)
    assert rows["int8"]["weight_ratio"] < 0.35 and rows["int4"]["weight_ratio"] < 0.5
    assert rows["fp32"]["perplexity_ratio"] == 1.0 and rows["fp32"]["greedy_token_agreement"] == 1.0
    assert rows["fp32"]["greedy_prompts_identical"] == 32
    assert all(0 <= row["greedy_token_agreement"] <= 1 and row["perplexity"] > 1
               for row in rows.values())
    # peers: CTranslate2 (a dev requirement) ran on the same prompt; llama.cpp needs a GGUF file
    peers = result["peers"]
    assert all(peers[f"ctranslate2 {c}"]["decode_tokens_per_s"] > 0 for c in ("float32", "int8"))
    assert peers["llama.cpp"] == {"skipped": f"{tiny_model_dir} has no GGUF file to run"}
    from mlx_kernels.quantized_linear import cpu_kernels, cpu_kernels_line

    assert result["cpu"] == cpu_kernels()  # the CPU and kernels the figures were measured on
    assert f"kernels here: {cpu_kernels_line(result['cpu'])}" in done.output.replace("\n", "")
    bad = CliRunner().invoke(build_app(), ["bench", "quant", "--schemes", "int8,fp8"])
    assert bad.exit_code == 1 and "unknown quantization scheme 'fp8'" in bad.output


@pytest.mark.parametrize(("family", "scheme"), [
    *[(family, "int4") for family in ("tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-mixtral")],
    ("tiny-gpt2", "int8"), ("tiny-gpt2", "w8a8"), ("tiny-llama", "w7a8")])
def test_save_and_load_a_quantized_checkpoint_round_trip(tmp_path, family, scheme):
    """In mlx's own form (int4; GPT-2, whose HF linears compressed-tensors cannot quantize;
    the other int8 / W8A8 models: tests/core/test_compressed_tensors.py): the saved tensors are
    the quantized ones (no fp32 weight), the scheme is in config.json, and the model loads back
    computing exactly what it computed."""
    import json

    from safetensors import safe_open

    from mlx_core import save_model

    model = quantize(_model(family), scheme)
    save_model(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "mlx", "scheme": scheme}
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert not any(k.endswith("proj.weight") for k in dtypes)
    assert dtypes["model.layers.0.self_attn.q_proj.qweight"] in ("I8", "U8")
    loaded = load_model(tmp_path / "q")
    assert loaded.quantization == scheme
    assert type(loaded.lm_head) is type(model.lm_head)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)
    with pytest.raises(ValueError, match=f"quantized with {scheme} already"):
        load_model(tmp_path / "q", quantization="int4-g64")


def test_a_checkpoint_quantized_by_another_tool_is_named(tiny_model_dir):
    import json

    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tiny_model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantized by 'gptq', which mlx does not read yet"):
        load_model(tiny_model_dir)


def test_mlx_models_quantize_writes_what_mlx_generate_reads(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from mlx_core import load_tokenizer
    from mlx_core.cli.app import build_app

    runner = CliRunner()
    out = tmp_path / "int4"
    done = runner.invoke(build_app(), ["models", "quantize", str(tiny_model_dir), str(out),
                                       "--scheme", "int4"])
    assert done.exit_code == 0, done.output
    tokenizer = load_tokenizer(out)  # the tokenizer files travel along
    want = generate(load_model(tiny_model_dir, quantization="int4"), tokenizer.encode("hello there"),
                    max_new_tokens=5, stop_token_ids=tokenizer.eos_token_ids)
    done = runner.invoke(build_app(), ["generate", "-m", str(out), "-p", "hello there", "-n", "5",
                                       "--no-chat"])
    assert done.exit_code == 0 and done.output == tokenizer.decode(want) + "\n", done.output
    again = runner.invoke(build_app(), ["models", "quantize", str(tiny_model_dir), str(out),
                                        "--scheme", "int8"])
    assert again.exit_code == 1 and "pass --overwrite" in again.output
    bad = runner.invoke(build_app(), ["models", "quantize", str(tiny_model_dir), str(tmp_path / "x"),
                                      "--scheme", "int3"])
    assert bad.exit_code == 1 and "unknown quantization scheme" in bad.output
    assert not (tmp_path / "x").exists()


def test_chunked_perplexity_equals_one_full_forward():
    """The bench's perplexity, fed 32 tokens at a time over a KV cache, is the full sequence's
    mean next-token loss (fp32 model: the same to fp32 rounding)."""
    import math

    from mlx_core.transforms.bench import greedy_prompts, perplexity

    model = _model("tiny-llama")
    ids = torch.randint(0, model.config.vocab_size, (100,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        loss = torch.nn.functional.cross_entropy(model(ids[None])[0, :-1], ids[1:])
    assert math.isclose(perplexity(model, ids.tolist()), math.exp(loss.item()), rel_tol=1e-5)
    prompts = greedy_prompts(list(range(600)))
    assert len(prompts) == 32 and all(len(p) == 16 for p in prompts) and prompts[1][0] == 18


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothquant_leaves_the_full_precision_function_unchanged(family):
    """Scales moved from activations to weights: fp32 logits equal to rounding (1e-4)."""
    from mlx_core.transforms.smoothquant import smooth

    model = _model(family)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.inference_mode():
        want = model(ids)
    calibration = torch.randint(0, model.config.vocab_size, (3, 16)).tolist()
    assert smooth(model, calibration, 0.65) >= model.config.num_layers
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), want, atol=1e-4, rtol=1e-4)


def test_smoothquant_shrinks_w8a8_error_on_an_outlier_channel():
    """An input channel 50x larger than the rest (folded into the weights, so the fp32 model is
    unchanged): per-token int8 activations lose the others; smoothing first wins it back."""
    from mlx_core.transforms.smoothquant import smooth

    fp32 = _model("tiny-llama")
    with torch.no_grad():
        for layer in fp32.model.layers:
            layer.input_layernorm.weight[3] *= 50
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight[:, 3] /= 50
    ids = torch.randint(0, fp32.config.vocab_size, (2, 24))
    calibration = torch.randint(0, fp32.config.vocab_size, (4, 32)).tolist()
    with torch.inference_mode():
        want = fp32(ids)
        plain = quantize(copy.deepcopy(fp32), "w8a8")(ids)
        smoothed = quantize(copy.deepcopy(fp32), "w8a8", calibration=calibration)(ids)
    assert (smoothed - want).abs().mean() < 0.7 * (plain - want).abs().mean()
    with pytest.raises(ValueError, match="calibration applies to w8a8"):
        quantize(copy.deepcopy(fp32), "int8", calibration=calibration)
    with pytest.raises(ValueError, match="alpha must be in"):
        smooth(copy.deepcopy(fp32), calibration, 1.5)


def test_load_model_w8a8_calibrates_on_the_shipped_text(tiny_model_dir):
    full = load_model(tiny_model_dir)
    w8a8 = load_model(tiny_model_dir, quantization="w8a8")
    assert not torch.equal(w8a8.model.layers[0].input_layernorm.weight,
                           full.model.layers[0].input_layernorm.weight)  # smoothed


@pytest.mark.slow
def test_bench_quant_compile_reports_compiled_decode(tiny_model_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from mlx_core.cli.app import build_app

    out = tmp_path / "quant.json"
    done = CliRunner().invoke(build_app(), ["bench", "quant", "-m", str(tiny_model_dir),
                                            "--schemes", "int4", "--compile", "--no-quality",
                                            "--prompt-len", "8", "--new-tokens", "4", "--rounds",
                                            "1", "--json", str(out)])
    assert done.exit_code == 0, done.output
    rows = json.loads(out.read_text())["schemes"]
    assert rows["fp32"]["compiled_vs_compiled_fp32"] == 1.0
    assert all(row["compiled_decode_tokens_per_s"] > 0 and row["compiled_decode_ratio"] > 0
               for row in rows.values())
