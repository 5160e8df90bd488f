"""int8 / W8A8 checkpoints in the compressed-tensors format: mlx writes what HF transformers reads,
and reads back its own and another tool's (the ``compressed-tensors`` package writing as
llm-compressor does).

Tolerances against HF (fp32 logits, our side on its torch references, ``MLX_KERNELS=torch``):
int8 weight-only 1e-5, the same weights in the same ``F.linear`` (measured: 0.0); W8A8 3% of the
logits' largest magnitude, because the two quantize activations differently: compressed-tensors'
dynamic per-token scale is max|x| / 127.5 with values in [-128, 127] (ours: / 127 in [-127, 127]),
and HF runs the LM head (in ``ignore``) on unquantized activations where our W8A8 head quantizes
them (measured: 0.7-1.0%). The weights themselves are compared bit for bit.
"""

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from mlx_core import build_model, get_preset, load_model, save_model
from mlx_core.transforms import Int8Linear, QuantizedEmbedding, W8A8Linear, quantize
from mlx_core.transforms.compressed_tensors import pack_int8, unpack_int8

LAYER = {"int8": Int8Linear, "w8a8": W8A8Linear}
FORMAT = {"int8": "pack-quantized", "w8a8": "int-quantized"}


def _model(family: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(get_preset(family)).eval()


def _ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))


def _saved(tmp_path, family: str, scheme: str):
    model = quantize(_model(family), scheme)
    return model, save_model(model, tmp_path / f"{family}-{scheme}")


def _quantization_config(directory) -> dict:
    return json.loads((directory / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2", "tiny-mixtral"])
@pytest.mark.parametrize("scheme", ["int8", "w8a8"])
def test_round_trip_in_mlx_gives_the_same_int8_tensors_and_logits(tmp_path, family, scheme):
    model, directory = _saved(tmp_path, family, scheme)
    config = _quantization_config(directory)
    assert config["quant_method"] == "compressed-tensors" and config["format"] == FORMAT[scheme]
    assert config["quantization_status"] == "compressed"
    group = config["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["weights"]["strategy"] == "channel"
    assert (group["input_activations"] or {}).get("strategy") == ("token" if scheme == "w8a8" else None)
    assert "lm_head" in config["ignore"]
    assert all(("block_sparse_moe.gate" in n) for n in config["ignore"] if n != "lm_head")
    with safe_open(directory / "model.safetensors", "pt") as f:
        tensors = {k: f.get_slice(k) for k in f.keys()}
    q_proj = "model.layers.0.self_attn.q_proj"
    stored = "weight" if scheme == "w8a8" else "weight_packed"
    assert tensors[f"{q_proj}.{stored}"].get_dtype() == ("I8" if scheme == "w8a8" else "I32")
    assert tensors[f"{q_proj}.weight_scale"].get_shape() == [64, 1]
    assert tensors["model.embed_tokens.weight"].get_dtype() == "F32"  # de-quantized values
    assert not any(k.endswith((".qweight", ".scale")) for k in tensors)
    assert ("lm_head.weight" in tensors) == (not model.config.tie_word_embeddings)

    loaded = load_model(directory)
    assert loaded.quantization == scheme
    assert type(loaded.model.layers[0].self_attn.q_proj) is LAYER[scheme]
    assert type(loaded.lm_head) is LAYER[scheme]
    assert isinstance(loaded.model.embed_tokens, QuantizedEmbedding)
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.qweight is loaded.model.embed_tokens.qweight
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) and want[k].dtype == got[k].dtype for k in want)
    ids = _ids(model.config.vocab_size)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)
    with pytest.raises(ValueError, match=f"quantized with {scheme} already"):
        load_model(directory, quantization="int4")


def test_int8_packing_is_compressed_tensors_own():
    pack_to_int32 = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers"
                                        ).pack_to_int32
    q = torch.randint(-128, 128, (6, 42), generator=torch.Generator().manual_seed(0)).to(torch.int8)
    packed = pack_int8(q)
    assert torch.equal(packed, pack_to_int32(q, 8))
    assert torch.equal(unpack_int8(packed, q.shape), q)


@pytest.mark.hf_parity
@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("scheme", ["int8", "w8a8"])
def test_transformers_loads_what_mlx_writes(tmp_path, family, scheme, monkeypatch):
    pytest.importorskip("compressed_tensors")
    import transformers

    model, directory = _saved(tmp_path, family, scheme)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = _ids(model.config.vocab_size)
    monkeypatch.setenv("MLX_KERNELS", "torch")  # the layers' references, fp32 activations
    with torch.inference_mode():
        got, want = hf(ids).logits, model(ids)
    if scheme == "int8":
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        assert (got - want).abs().max() <= 0.03 * want.abs().max()
    # HF computes with exactly our weights (decompressed on its first forward)
    hf_modules = dict(hf.named_modules())
    for name, layer in model.named_modules():
        if isinstance(layer, (Int8Linear, QuantizedEmbedding)):
            assert torch.equal(hf_modules[name].weight, layer.dequantized_weight()), name


def _write_like_llm_compressor(directory, scheme: str) -> nn.Module:
    """A tiny HF Llama (tied embeddings) quantized and saved by the compressed-tensors package,
    as llm-compressor does: weight scales max|w| / 127.5 (so -128 occurs), the head ignored."""
    import transformers
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    weights = QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True)
    tokens = QuantizationArgs(num_bits=8, type="int", strategy="token", symmetric=True, dynamic=True)
    group = QuantizationScheme(targets=["Linear"], weights=weights,
                               input_activations=tokens if scheme == "w8a8" else None)
    apply_quantization_config(hf, QuantizationConfig(config_groups={"group_0": group},
                                                     ignore=["lm_head"]))
    for layer in hf.modules():
        if hasattr(layer, "weight_scale"):  # calibration: min-max per output channel
            w = layer.weight.data
            scale, _ = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), weights)
            layer.weight_scale.data.copy_(scale)
            layer.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(hf)
    compressor.compress_model(hf)
    hf.save_pretrained(directory)
    compressor.update_config(directory)
    return hf


@pytest.mark.hf_parity
@pytest.mark.parametrize("scheme", ["int8", "w8a8"])
def test_mlx_reads_a_checkpoint_another_tool_wrote(tmp_path, scheme, monkeypatch):
    pytest.importorskip("compressed_tensors")
    import transformers

    _write_like_llm_compressor(tmp_path / "theirs", scheme)
    assert _quantization_config(tmp_path / "theirs")["format"] == FORMAT[scheme]
    ours = load_model(tmp_path / "theirs")
    assert ours.quantization == scheme
    layers = [m for m in ours.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 14 and all(type(m) is LAYER[scheme] for m in layers)
    assert any(bool((m.qweight == -128).any()) for m in layers)
    # their full-precision embedding and (tied) head stay as they are: what HF computes
    assert type(ours.model.embed_tokens) is nn.Embedding
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "theirs").eval()
    ids = _ids(128)
    with torch.inference_mode():
        want = hf(ids).logits
        fast = ours(ids)
        monkeypatch.setenv("MLX_KERNELS", "torch")
        reference = ours(ids)
    if scheme == "int8":
        torch.testing.assert_close(reference, want, atol=1e-5, rtol=1e-5)
    else:
        assert (reference - want).abs().max() <= 0.03 * want.abs().max()
    assert (fast - reference).abs().max() <= 0.02 * reference.abs().max()  # -128 on the fast paths
    # and mlx writes it back as it read it
    save_model(ours, tmp_path / "again")
    again = load_model(tmp_path / "again")
    with torch.inference_mode():
        torch.testing.assert_close(again(ids), reference, atol=0, rtol=0)


W4A16 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}
FP8 = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}


@pytest.mark.parametrize(("change", "named"), [
    ({"weights": W4A16, "format": "pack-quantized"}, "weights int4 per group of 128, symmetric, static"),
    ({"weights": {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "channel"}},
     "weights int8 per channel, asymmetric, static"),
    ({"weights": FP8, "input_activations": {**FP8, "strategy": "token", "dynamic": True},
      "format": "float-quantized"},
     "format 'float-quantized', weights float8 per channel, symmetric, static, input activations "
     "float8 per token, symmetric, dynamic"),
    ({"input_activations": {"num_bits": 8, "type": "int", "strategy": "tensor", "dynamic": False}},
     "input activations int8 per tensor, symmetric, static"),
    ({"kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor"}}, "kv cache scheme"),
])
def test_a_scheme_mlx_cannot_run_exactly_is_refused_by_name(tmp_path, change, named):
    _, directory = _saved(tmp_path, "tiny-llama", "w8a8")
    config = json.loads((directory / "config.json").read_text())
    quantization = config["quantization_config"]
    group = quantization["config_groups"]["group_0"]
    for key, value in change.items():
        (quantization if key == "kv_cache_scheme" else group)[key] = value
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as refused:
        load_model(directory)
    message = str(refused.value)
    assert "compressed-tensors checkpoint that mlx cannot run exactly" in message
    assert named in message and "mlx reads int8 weights" in message


def test_int4_and_gpt2_keep_mlx_form(tmp_path):
    assert _quantization_config(_saved(tmp_path, "tiny-llama", "int4")[1])["quant_method"] == "mlx"
    assert _quantization_config(_saved(tmp_path, "tiny-gpt2", "int8")[1])["quant_method"] == "mlx"
