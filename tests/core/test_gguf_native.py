"""GGUF quantized tensors loaded as they are shipped (``load_model(..., quantization="gguf")``):
Q4_0 / Q4_1 / Q8_0 blocks into the int4 / int8 layouts, equal to the ``gguf`` package's own
de-quantization value for value; the built-in model (Q4_1 + a Q8_0 embedding) runs on them."""

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


def _write_gguf(path, types, tied=False):
    """A tiny llama GGUF: weights of the given GGML types, F32 norms."""
    import gguf

    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    head = HIDDEN // HEADS
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "blk.0.attn_q.weight": (HIDDEN, HIDDEN),
              "blk.0.attn_k.weight": (KV_HEADS * head, HIDDEN),
              "blk.0.attn_v.weight": (KV_HEADS * head, HIDDEN),
              "blk.0.attn_output.weight": (HIDDEN, HIDDEN), "blk.0.ffn_gate.weight": (FFN, HIDDEN),
              "blk.0.ffn_up.weight": (FFN, HIDDEN), "blk.0.ffn_down.weight": (HIDDEN, FFN)}
    if not tied:
        shapes["output.weight"] = (VOCAB, HIDDEN)
    for i, (name, shape) in enumerate(shapes.items()):
        w = rng.standard_normal(shape).astype(np.float32) * 0.1
        qtype = getattr(gguf.GGMLQuantizationType, types[i % len(types)])
        blocks = gguf.quants.quantize(w, qtype)
        writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
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


@pytest.mark.parametrize("types,tied", [(("Q4_0",), False), (("Q4_1",), True),
                                        (("Q8_0",), False), (("Q4_1", "Q8_0", "Q4_0"), True)])
def test_blocks_equal_the_gguf_packages_dequantization(tmp_path, types, tied):
    path = _write_gguf(tmp_path / "tiny.gguf", types, tied)
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


def test_a_type_it_does_not_read_is_named(tmp_path):
    path = _write_gguf(tmp_path / "bf16.gguf", ("BF16",))
    with pytest.raises(ValueError, match=r"is BF16, which mlx does not read as it is shipped \(it "
                                         r"reads F32, F16, Q4_0, Q4_1, Q8_0\).*'int8' or 'int4'"):
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
