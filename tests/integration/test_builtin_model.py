"""The built-in real model against transformers' own GGUF loading of the same file.

Tolerances: logits within 1e-4 max-abs (fp32); greedy continuations token-for-token identical.
"""

import pytest
import torch
import transformers

from mlx_core import generate, load_model, load_tokenizer
from mlx_core.sources import BUILTIN_MODEL, resolve_model_dir

pytestmark = [pytest.mark.builtin_model, pytest.mark.hf_parity, pytest.mark.slow]

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a neural network is.",
    "List three prime numbers.",
    "How do I reverse a list in Python?",
]


@pytest.fixture(scope="module")
def hf_gguf(builtin_gguf_path):
    kwargs = dict(gguf_file=builtin_gguf_path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        builtin_gguf_path.parent, dtype=torch.float32, **kwargs).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(builtin_gguf_path.parent, **kwargs)
    return model, tokenizer


@pytest.fixture(scope="module")
def ours(builtin_model_dir):
    return load_model(BUILTIN_MODEL), load_tokenizer(BUILTIN_MODEL)


def _chat_ids(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                         add_generation_prompt=True, tokenize=True)


@torch.no_grad()
def test_logits_match_transformers_gguf_loading(hf_gguf, ours):
    hf_model, hf_tok = hf_gguf
    model, _ = ours
    ids = torch.tensor([hf_tok.encode("The quick brown fox jumps over the lazy dog. " * 3)])
    assert (model(ids) - hf_model(ids).logits).abs().max() < 1e-4


@torch.no_grad()
def test_greedy_chat_continuations_match_hf_generate(hf_gguf, ours):
    hf_model, hf_tok = hf_gguf
    model, tok = ours
    for text in CHATS:
        prompt = _chat_ids(tok, text)
        hf_prompt = hf_tok.apply_chat_template([{"role": "user", "content": text}],
                                               add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
        assert list(prompt) == list(hf_prompt)
        ref = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                                max_new_tokens=32, do_sample=False,
                                pad_token_id=hf_tok.pad_token_id)[0, len(prompt):].tolist()
        got = generate(model, prompt, max_new_tokens=32)  # both stop at <|im_end|>
        assert got == ref, f"{text!r}: {tok.decode(got)!r} != {tok.decode(ref)!r}"


def test_cache_is_reused_not_reconverted(builtin_model_dir):
    weights = builtin_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert resolve_model_dir(BUILTIN_MODEL) == builtin_model_dir
    assert weights.stat().st_mtime_ns == before
