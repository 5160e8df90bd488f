"""GGUF quantized tensors loaded as they are shipped (``load_model(..., quantization="gguf")``):
Q4_0 / Q4_1 / Q4_K blocks into the int4 layout and Q8_0 / Q5_0 / Q6_K into int8 in groups,
equal to the ``gguf`` package's own de-quantization value for value; the built-in model (Q4_1 +
a Q8_0 embedding) runs on them."""

import numpy as np
import pytest
import torch

from mlx_core import load_model
from mlx_core.config import ModelConfig
from mlx_core.gguf_blocks import read_gguf_blocks
from mlx_core.gguf_convert import read_gguf
from mlx_core.transforms import Int4Linear, Int8Linear, QuantizedEmbedding
from mlx_core.transforms.quantize import load_quantized_state

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 64, 96, 4, 2, 128


def _random_blocks(qtype, shape, rng):
    """Blocks of a GGML type that the gguf package de-quantizes but cannot write (the
    K-quants): random bytes, every one a valid block once its fp16 super-scales are set to small
    positive values."""
    import gguf

    rows, cols = shape
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, cols // block_values, block_bytes), dtype=np.uint8)
    # Q4_K: d and dmin lead the block; Q6_K: d ends it
    where = {"Q4_K": slice(0, 4), "Q6_K": slice(block_bytes - 2, block_bytes)}[qtype.name]
    count = (where.stop - where.start) // 2
    d = rng.uniform(1e-3, 1e-2, (rows, cols // block_values, count)).astype(np.float16)
    blocks[..., where] = d.view(np.uint8)
    return blocks.reshape(rows, -1)


def _write_gguf(path, types, tied=False, hidden=HIDDEN, ffn=FFN):
    """A tiny llama GGUF: weights of the given GGML types, F32 norms."""
    import gguf

    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    head = hidden // HEADS
    shapes = {"token_embd.weight": (VOCAB, hidden), "blk.0.attn_q.weight": (hidden, hidden),
              "blk.0.attn_k.weight": (KV_HEADS * head, hidden),
              "blk.0.attn_v.weight": (KV_HEADS * head, hidden),
              "blk.0.attn_output.weight": (hidden, hidden), "blk.0.ffn_gate.weight": (ffn, hidden),
              "blk.0.ffn_up.weight": (ffn, hidden), "blk.0.ffn_down.weight": (hidden, ffn)}
    if not tied:
        shapes["output.weight"] = (VOCAB, hidden)
    for i, (name, shape) in enumerate(shapes.items()):
        qtype = getattr(gguf.GGMLQuantizationType, types[i % len(types)])
        if qtype.name.endswith("_K"):
            blocks = _random_blocks(qtype, shape, rng)
        else:
            blocks = gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32) * 0.1, qtype)
        writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _model_from(read):
    from mlx_core.models.transformer import Transformer

    config = ModelConfig.from_hf_config(read.hf_config)
    with torch.device("meta"):
        model = Transformer(config)
    state = {k: torch.from_numpy(v) for k, v in read.tensors.items()}
    return load_quantized_state(model, state, "gguf")


# the K-quants' super-blocks span 256 inputs: a model that wide
K_DIMS = {"hidden": 256, "ffn": 512}


@pytest.mark.parametrize("types,tied,dims", [
    (("Q4_0",), False, {}), (("Q4_1",), True, {}), (("Q8_0",), False, {}), (("Q5_0",), True, {}),
    (("Q4_1", "Q8_0", "Q4_0", "Q5_0"), True, {}), (("Q4_K",), True, K_DIMS),
    (("Q6_K",), False, K_DIMS), (("Q4_K", "Q6_K", "Q4_K", "Q8_0"), False, K_DIMS)])
def test_blocks_equal_the_gguf_packages_dequantization(tmp_path, types, tied, dims):
    path = _write_gguf(tmp_path / "tiny.gguf", types, tied, **dims)
    read, reference = read_gguf_blocks(path), read_gguf(path)
    assert read.hf_config == reference.hf_config
    model = _model_from(read)
    assert model.quantization == "gguf"
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    for name, want in reference.tensors.items():
        prefix = name.removesuffix(".weight")
        module = model.get_submodule(prefix)
        if isinstance(module, (Int4Linear, Int8Linear, QuantizedEmbedding)):
            got = module.dequantized_weight()
        else:
            got = module.weight
        assert torch.equal(got, torch.from_numpy(want)), name
    if tied:  # the head runs on the table's own tensors
        assert model.lm_head.qweight is model.model.embed_tokens.qweight


def _full_precision_model(reference):
    from mlx_core.models.transformer import Transformer

    model = Transformer(ModelConfig.from_hf_config(reference.hf_config)).eval()
    state = {k: torch.from_numpy(v.copy()) for k, v in reference.tensors.items()}
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model


@pytest.mark.parametrize("kernels,tolerance", [("torch", 1e-5), ("auto", 2e-2)])
def test_k_quant_model_computes_what_its_dequantized_weights_do(tmp_path, monkeypatch, kernels,
                                                               tolerance):
    """A Q4_K_M-like mix (Q4_K linears, Q6_K embedding, o_proj and head) runs on its blocks: the
    torch references equal the de-quantized fp32 model to fp32 rounding; the CPU fast paths
    (torch's int4 kernel with bf16 activations and scales, the native per-group int8 loop for
    Q6_K's groups of 16) within bf16's rounding (relative to the logits' range)."""
    path = _write_gguf(tmp_path / "mix.gguf", ("Q6_K", "Q4_K", "Q4_K", "Q4_K"), **K_DIMS)
    model, full = _model_from(read_gguf_blocks(path)), _full_precision_model(read_gguf(path))
    assert model.lm_head.scale.shape == (VOCAB, K_DIMS["hidden"] // 16)  # Q6_K: a scale per 16
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv("MLX_KERNELS", kernels)
    with torch.inference_mode():
        got, want = model(ids), full(ids)
    scale = want.abs().max().item()
    torch.testing.assert_close(got / scale, want / scale, atol=tolerance, rtol=0)


def test_a_type_it_does_not_read_is_named(tmp_path):
    path = _write_gguf(tmp_path / "bf16.gguf", ("BF16",))
    with pytest.raises(ValueError, match=r"is BF16, which mlx does not read as it is shipped \(it "
                                         r"reads F32, F16, Q4_0, Q4_1, Q4_K, Q8_0, Q5_0, "
                                         r"Q6_K\).*'int8' or 'int4'"):
        read_gguf_blocks(path)


def test_a_source_without_a_gguf_file_says_so(tiny_model_dir):
    with pytest.raises(ValueError, match="comes from none; quantize it with 'int8', 'int4'"):
        load_model(tiny_model_dir, quantization="gguf")


@pytest.mark.builtin_model
def test_builtin_model_runs_on_the_weights_it_ships(monkeypatch):
    """Q4_1 linears and the Q8_0 embedding/head as shipped: with the reference kernels the
    logits equal the de-quantized fp32 model's (1e-4: fp32 summation order); generation runs
    on the fast kernels."""
    from mlx_core import generate, load_tokenizer

    model = load_model("smollm2-135m-instruct", quantization="gguf")
    assert isinstance(model.model.layers[0].mlp.gate_proj, Int4Linear)
    assert model.lm_head.qweight is model.model.embed_tokens.qweight
    full = load_model("smollm2-135m-instruct")
    ids = torch.randint(100, 40000, (1, 24), generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv("MLX_KERNELS", "torch")
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), full(ids), atol=1e-4, rtol=1e-4)
    monkeypatch.delenv("MLX_KERNELS")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in tokenizer.decode(generate(model, prompt, max_new_tokens=12))
