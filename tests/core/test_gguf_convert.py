"""GGUF -> HF directory: tensors, config and tokenizer against transformers' own GGUF loading."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from mlx_core.gguf_convert import _unpermute, convert_gguf_to_hf_dir, read_gguf
from mlx_core.tokenizer import IncrementalDecoder, Tokenizer

TEXTS = [
    "Hello, world!",
    "The year 2024 had 366 days; 12345 + 678 = 13023.",
    "héllo wörld 😀 日本語 — ça va?",
    "def f(x):\n\treturn  x * 2  # two spaces\n\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "   leading spaces and trailing   ",
]


def test_unpermute_inverts_llama_cpp_permute():
    # llama.cpp's permute, as its convert script writes it, for the round trip
    def permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.arange(3 * 8 * 16, dtype=np.float32).reshape(3 * 8, 16)  # 3 heads of dim 8
    assert np.array_equal(_unpermute(permute(w, 3), 3), w)


def test_garbage_file_is_named(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="x.gguf"):
        read_gguf(bad)


@pytest.fixture(scope="module")
def converted(builtin_gguf_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    convert_gguf_to_hf_dir(builtin_gguf_path, out)
    return out


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(builtin_gguf_path):
    return transformers.AutoTokenizer.from_pretrained(builtin_gguf_path.parent,
                                                      gguf_file=builtin_gguf_path.name)


@pytest.mark.builtin_model
@pytest.mark.hf_parity
@pytest.mark.slow
def test_tensors_equal_transformers_gguf_loading(builtin_gguf_path, converted):
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        builtin_gguf_path.parent, gguf_file=builtin_gguf_path.name, dtype=torch.float32)
    ours = read_gguf(builtin_gguf_path)
    theirs = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied
    assert set(ours.tensors) == set(theirs)
    for name, tensor in theirs.items():
        assert np.array_equal(ours.tensors[name], tensor.numpy()), name
    config = transformers.AutoConfig.from_pretrained(converted)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "tie_word_embeddings", "rms_norm_eps"):
        assert getattr(config, key) == getattr(hf.config, key), key


@pytest.mark.builtin_model
@pytest.mark.hf_parity
def test_tokenizer_matches_transformers_gguf_tokenizer(converted, hf_gguf_tokenizer):
    ours = Tokenizer.from_dir(converted)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf_gguf_tokenizer.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == text
    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    assert ours.apply_chat_template(chat, add_generation_prompt=False, tokenize=False) == \
        hf_gguf_tokenizer.apply_chat_template(chat, tokenize=False)


@pytest.mark.builtin_model
def test_incremental_decoder_streams_the_full_text(converted):
    tok = Tokenizer.from_dir(converted)
    text = "Streaming ✓ works: 日本語, émoji 😀👍, and numbers 3.14159!"
    ids = tok.encode(text)
    decoder = IncrementalDecoder(tok)
    assert "".join(decoder.push(i) for i in ids) == tok.decode(ids) == text


@pytest.mark.builtin_model
def test_conversion_runs_without_torch(builtin_gguf_path, tmp_path):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from pathlib import Path\n"
        "from mlx_core.gguf_convert import convert_gguf_to_hf_dir\n"
        f"convert_gguf_to_hf_dir(Path({str(builtin_gguf_path)!r}), Path({str(tmp_path)!r}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"}
