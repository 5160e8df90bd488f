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


@pytest.fixture(scope="module")
def hf_chat_references(hf_gguf, ours):
    """HF generate's greedy continuation of each chat prompt, alone (32 tokens or <|im_end|>)."""
    hf_model, hf_tok = hf_gguf
    _, tok = ours
    refs = []
    for text in CHATS:
        prompt = _chat_ids(tok, text)
        hf_prompt = hf_tok.apply_chat_template([{"role": "user", "content": text}],
                                               add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
        assert list(prompt) == list(hf_prompt)
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                    attention_mask=torch.ones(1, len(prompt)),
                                    pad_token_id=hf_tok.pad_token_id)[0, len(prompt):].tolist()
        refs.append((prompt, ref))
    return refs


def test_greedy_chat_continuations_match_hf_generate(hf_chat_references, ours):
    model, tok = ours
    for text, (prompt, ref) in zip(CHATS, hf_chat_references, strict=True):
        got = generate(model, prompt, max_new_tokens=32)  # both stop at <|im_end|>
        assert got == ref, f"{text!r}: {tok.decode(got)!r} != {tok.decode(ref)!r}"


@pytest.mark.parametrize("options", [{}, dict(max_num_batched_tokens=24), dict(
    speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
                        "prompt_lookup_min": 1})], ids=["default", "chunked-prefill", "ngram-drafts"])
def test_serving_engine_batch_matches_hf_generate_one_by_one(hf_chat_references, ours, options):
    from mlx_serve import LLM, SamplingParams

    model, tok = ours
    llm = LLM(model, tokenizer=tok, kv_cache_memory="256MiB", **options)
    prompts = [{"prompt_token_ids": prompt} for prompt, _ in hf_chat_references]
    for _ in range(2):  # the second time the shared chat-template prefix is cached
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32))
        for text, out, (_, ref) in zip(CHATS, outs, hf_chat_references, strict=True):
            got = out.outputs[0].token_ids
            assert got == ref, f"{text!r}: {tok.decode(got)!r} != {tok.decode(ref)!r}"
    stats = llm.engine.stats()
    assert stats.prefix_cache_hit_rate > 0.4
    if "speculative_config" in options:  # drafts were checked, and kept where they were right
        assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def test_a_chats_next_turn_reuses_all_of_the_last_turn_and_matches_hf(hf_gguf, ours):
    from mlx_serve import LLM, SamplingParams

    hf_model, hf_tok = hf_gguf
    model, tok = ours
    llm = LLM(model, tokenizer=tok, kv_cache_memory="256MiB")
    params = SamplingParams(temperature=0, max_tokens=32)
    chat = [{"role": "user", "content": CHATS[3]}]
    first = llm.chat([chat], params)[0]
    chat += [{"role": "assistant", "content": first.outputs[0].text},
             {"role": "user", "content": "And three more?"}]
    second = llm.chat([chat], params)[0]
    # the last turn's prompt and reply came from the cache, its partly filled last block too
    # (all but the reply's last token, whose key/value was never computed)
    computed = len(first.prompt_token_ids) + len(first.outputs[0].token_ids) - 1
    assert second.metrics.num_cached_tokens == computed and computed % 16 != 0
    prompt = second.prompt_token_ids
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                attention_mask=torch.ones(1, len(prompt)),
                                pad_token_id=hf_tok.pad_token_id)[0, len(prompt):].tolist()
    assert second.outputs[0].token_ids == ref
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def test_cache_is_reused_not_reconverted(builtin_model_dir):
    weights = builtin_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert resolve_model_dir(BUILTIN_MODEL) == builtin_model_dir
    assert weights.stat().st_mtime_ns == before
