"""GGUF beyond llama: Qwen2 (q/k/v biases) and Qwen3 (q/k norms) files, written here the way
llama.cpp lays them out (the gguf package's own HF -> GGUF tensor names; no Q/K row permutation
for these architectures; a byte-level BPE tokenizer with the "qwen2" pre-tokenizer), load into
the zoo with the logits of transformers' own GGUF loader (1e-4) and of the model they came from,
and with the tokenizer they were written with."""

import json
import math

import numpy as np
import pytest
import torch
import transformers

from mlx_core import load_model, load_tokenizer

pytestmark = pytest.mark.hf_parity

CORPUS = ["The quick brown fox jumps over the lazy dog 12345.", "Qwen writes digits 2024 one by one",
          "hello world, hello GGUF!"] * 20
CONFIGS = {  # transformers config class, HF model class, GGUF architecture, extra options
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(tie_word_embeddings=False)),
    # post-norms and whole-projection q/k norms
    "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM, dict(tie_word_embeddings=False)),
    # fused qkv and gate_up tensors (attn_qkv, ffn_up)
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM,
             dict(tie_word_embeddings=False, pad_token_id=0, bos_token_id=0, eos_token_id=2)),
}
# Gemma: sandwich norms (stored as 1 + weight), soft-caps (2), q/k norms and a second RoPE base
# (3), sliding windows shorter than the test's sequences. head_dim 256: transformers' GGUF loader
# leaves query_pre_attn_scalar at its default of 256, and llama.cpp scales by head_dim
_GEMMA = dict(head_dim=256, sliding_window=8, pad_token_id=0, bos_token_id=0, eos_token_id=2)
CONFIGS["gemma2"] = (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, _GEMMA)
# six layers: llama.cpp's (and HF's default) five sliding layers to one full one
CONFIGS["gemma3"] = (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
                     dict(_GEMMA, num_hidden_layers=6))
TRANSFORMERS_READS = ("qwen2", "qwen3", "phi3", "gemma2", "gemma3")  # it has no olmo2 loader


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def add_tokenizer(writer, tok):
    """``tok`` (byte-level BPE) as llama.cpp writes one: the "qwen2" pre-tokenizer, control
    tokens <|...|>, ids 0 / 2 / 0 for BOS / EOS / padding."""
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)  # transformers' Phi-3 otherwise takes 32000, past this vocabulary


def _write_gguf(path, hf, tok, arch: str, quantized=None):
    """``quantized``: a gguf.GGMLQuantizationType for the 2-D tensors (else all F32)."""
    import gguf

    c = hf.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer.add_key_length(head_dim)  # Qwen3's 128 is not hidden / heads here
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    rope = getattr(c, "rope_parameters", None) or {"rope_theta": c.rope_theta}
    writer.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
    tensors = {}
    if rope.get("rope_type") == "longrope":  # llama.cpp's Phi-3: factors as tensors, two keys
        original = rope["original_max_position_embeddings"]
        scale = c.max_position_embeddings / original
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
        for which in ("long", "short"):
            tensors[f"rope_factors_{which}.weight"] = np.array(rope[f"{which}_factor"], np.float32)
    if arch.startswith("gemma"):  # what llama.cpp's converter writes for Gemma
        writer.add_sliding_window(c.sliding_window)
        if arch == "gemma2":
            writer.add_attn_logit_softcapping(c.attn_logit_softcapping)
            writer.add_final_logit_softcapping(c.final_logit_softcapping)
    add_tokenizer(writer, tok)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        array = tensor.float().numpy()
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            array = array + 1  # llama.cpp stores Gemma's (1 + weight)
        tensors[names.get_name(name, try_suffixes=(".weight", ".bias"))] = array
    write_tensors(writer, tensors, quantized)
    return path


def write_tensors(writer, tensors, quantized=None):
    """Finish a GGUF file with ``tensors`` (GGUF name -> fp32 array); ``quantized``: the type
    its matrices (rows a multiple of 32 long) are written in, else all F32."""
    import gguf

    for name, array in tensors.items():
        array = np.ascontiguousarray(array, dtype=np.float32)
        if quantized is not None and array.ndim >= 2 and array.shape[-1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(array, quantized), raw_dtype=quantized)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _source_model(arch: str, tok):
    config_class, model_class, extra = CONFIGS[arch]
    torch.manual_seed(0)
    hf = model_class(config_class(**{
        "vocab_size": tok.get_vocab_size(), "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128, **extra})).eval()
    with torch.no_grad():  # biases and norms away from their zero / one init
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return hf


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def written(request, tmp_path_factory):
    tok = _tokenizer()
    hf = _source_model(request.param, tok)
    directory = tmp_path_factory.mktemp(request.param)
    path = _write_gguf(directory / f"tiny-{request.param}.gguf", hf, tok, request.param)
    return request.param, hf, tok, path


@torch.no_grad()
def test_logits_equal_transformers_gguf_loading_and_the_source_model(written):
    arch, hf, _, path = written
    ours = load_model(path)
    assert ours.config.model_type == {"gemma3": "gemma3_text"}.get(arch, arch)
    ids = torch.randint(0, hf.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    logits = ours(ids)
    assert (logits - hf(ids).logits).abs().max() < 1e-4
    if arch in TRANSFORMERS_READS:
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name).eval()
        assert (logits - theirs(ids).logits).abs().max() < 1e-4


def test_tokenizer_equals_transformers_gguf_tokenizer(written):
    """Ids equal transformers' tokenizer from the same file ("qwen2": digits one by one), and,
    where no digit tells the pre-tokenizers apart, the tokenizer the file was written from."""
    arch, _, tok, path = written
    ours = load_tokenizer(path)
    theirs = (transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
              if arch in TRANSFORMERS_READS else None)
    for text in ("The quick brown fox 2024!", "hello GGUF, digits 12345 one by one", " spaced  out ",
                 "line one\n\nline two's"):
        if theirs is not None:
            assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text)) == text
    assert ours.encode("hello world, the lazy dog") == tok.encode("hello world, the lazy dog").ids


@torch.no_grad()
@pytest.mark.parametrize("arch", ["phi3", "gemma3"])
def test_shipped_quantized_equals_dequantized(tmp_path, arch):
    """Q8_0 files loaded as shipped (quantization="gguf": Phi-3's attn_qkv and ffn_up rows split
    into the zoo's projections without being de-quantized; Gemma's F32 norms offset as when
    de-quantizing): the logits of the same file de-quantized to fp32."""
    import gguf

    from mlx_core.transforms import Int8Linear

    tok = _tokenizer()
    hf = _source_model(arch, tok)
    path = _write_gguf(tmp_path / f"{arch}-q8.gguf", hf, tok, arch, gguf.GGMLQuantizationType.Q8_0)
    shipped, dequantized = load_model(path, quantization="gguf"), load_model(path)
    attention = shipped.model.layers[0].self_attn
    assert isinstance(attention.q_proj, Int8Linear) and isinstance(attention.v_proj, Int8Linear)
    assert isinstance(shipped.model.layers[0].mlp.up_proj, Int8Linear)
    ids = torch.randint(0, hf.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(2))
    assert (shipped(ids) - dequantized(ids)).abs().max() < 1e-3


@torch.no_grad()
def test_phi3_longrope_factors_load_from_their_tensors(tmp_path):
    """Phi-3's LongRoPE as llama.cpp writes it (rope_factors_long / _short tensors, the trained
    context and attention factor as keys): logits equal the source model's on both sides of the
    switch from short to long factors (original context 8)."""
    tok = _tokenizer()
    config_class, model_class, extra = CONFIGS["phi3"]
    torch.manual_seed(0)
    hf = model_class(config_class(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        original_max_position_embeddings=8, initializer_range=0.2,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0 + 0.3 * i for i in range(8)],
                      "long_factor": [1.0 + 2.0 * i for i in range(8)]}, **extra)).eval()
    ours = load_model(_write_gguf(tmp_path / "phi3-longrope.gguf", hf, tok, "phi3"))
    assert ours.config.rope_scaling["long_factor"] == [1.0 + 2.0 * i for i in range(8)]
    for length in (6, 17):  # short factors, then long ones
        ids = torch.randint(0, hf.config.vocab_size, (1, length),
                            generator=torch.Generator().manual_seed(length))
        assert (ours(ids) - hf(ids).logits).abs().max() < 1e-4, length


def test_an_unsupported_architecture_is_named(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="GGUF architecture 'mamba' is not supported yet; "
                                         "supported: llama, qwen2, qwen3, olmo2, phi3, gemma2, "
                                         "gemma3, deepseek2$"):
        load_model(tmp_path / "m.gguf")
