"""Jitted generation: greedy output equals the torch zoo's ``mlx_core.generate`` token for token;
bucketed prompts reuse the compiled programs; sampling is reproducible from explicit keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mlx_core
from mlx_jax import generation
from mlx_jax.generation import bucket_length, generate, stream_generate
from mlx_jax.sampling import SamplingOptions, filter_logits

# Left-padded batch of different lengths; 10 + 12 tokens pass tiny-mistral's window of 8.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [3, 4, 20, 21]]


def test_greedy_equals_torch_zoo(tiny_pair, tiny_preset):
    torch_model, _, jax_model = tiny_pair(tiny_preset)
    ref = mlx_core.generate(torch_model, PROMPTS, max_new_tokens=12, stop_token_ids=[])
    assert generate(jax_model, PROMPTS, max_new_tokens=12, stop_token_ids=[]) == ref


@pytest.mark.parametrize("preset", ["tiny-llama-dynamic-rope", "tiny-phi3-longrope"])
def test_length_dependent_rope_generation_equals_torch_zoo(preset, tmp_path):
    """Across the switch at 16 tokens, on weights large enough that the tables show in greedy
    tokens: dynamic NTK's table per step; Phi-3's LongRoPE computes every token again where
    the torch zoo (and HF) does, in the loop and in the stream."""
    import torch

    import mlx_jax

    torch.manual_seed(0)
    torch_model = mlx_core.build_model(mlx_core.get_preset(preset)).eval()
    torch_model.reset_parameters(std=0.2)
    jax_model = mlx_jax.load_model(mlx_core.save_model(torch_model, tmp_path / "model"))
    for prompts in ([[5, 6, 7, 8]], [PROMPTS[0] + [30, 31, 32, 33, 34, 35]], PROMPTS):
        ref = mlx_core.generate(torch_model, prompts, max_new_tokens=16, stop_token_ids=[])
        assert generate(jax_model, prompts, max_new_tokens=16, stop_token_ids=[]) == ref
    streamed = stream_generate(jax_model, PROMPTS[1], max_new_tokens=16, stop_token_ids=[])
    assert list(streamed) == mlx_core.generate(torch_model, PROMPTS[1], max_new_tokens=16,
                                               stop_token_ids=[])


def test_stop_token_ends_a_row_as_in_torch(tiny_pair):
    torch_model, _, jax_model = tiny_pair("tiny-llama")
    free = generate(jax_model, PROMPTS, max_new_tokens=12, stop_token_ids=[])
    stop = free[0][3]  # row 0 stops at its 4th token; row 1 runs on unless it meets it
    ref = mlx_core.generate(torch_model, PROMPTS, max_new_tokens=12, stop_token_ids=[stop])
    out = generate(jax_model, PROMPTS, max_new_tokens=12, stop_token_ids=[stop])
    assert out == ref
    assert out[0] == free[0][:4]


def test_prompts_in_one_bucket_reuse_the_compiled_programs(tiny_pair):
    _, _, model = tiny_pair("tiny-llama")
    assert bucket_length(3) == bucket_length(16) == 16 and bucket_length(17) == 32
    generate(model, [1, 2, 3], max_new_tokens=5, stop_token_ids=[])
    compiled = (generation._prefill._cache_size(), generation._decode._cache_size())
    generate(model, list(range(1, 15)), max_new_tokens=7, stop_token_ids=[])  # same buckets
    assert (generation._prefill._cache_size(), generation._decode._cache_size()) == compiled


def test_sampling_is_reproducible_from_its_key(tiny_pair):
    _, _, model = tiny_pair("tiny-llama")
    options = dict(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95, stop_token_ids=[])
    first = generate(model, PROMPTS, key=jax.random.key(1), **options)
    assert generate(model, PROMPTS, key=jax.random.key(1), **options) == first
    assert generate(model, PROMPTS, key=jax.random.key(2), **options) != first
    with pytest.raises(ValueError, match="explicit PRNG key"):
        generate(model, PROMPTS, temperature=1.0)


def test_top_k_and_top_p_keep_the_tokens_torch_keeps():
    logits = jnp.asarray(np.random.RandomState(0).randn(3, 40).astype(np.float32))
    kept_k = np.isfinite(np.asarray(filter_logits(logits, SamplingOptions(1.0, top_k=5))))
    assert (kept_k.sum(-1) == 5).all()
    assert (np.sort(np.argsort(-np.asarray(logits))[:, :5]) == np.sort(np.nonzero(kept_k)[1].reshape(3, 5))).all()
    # top-p keeps the smallest set of most likely tokens whose probability exceeds p.
    probs = np.asarray(jax.nn.softmax(logits / 0.7))
    kept_p = np.isfinite(np.asarray(filter_logits(logits, SamplingOptions(0.7, top_p=0.5))))
    for row in range(3):
        order = np.argsort(-probs[row])
        n = int(np.searchsorted(np.cumsum(probs[row][order]), 0.5) + 1)
        assert set(np.nonzero(kept_p[row])[0]) == set(order[:n])


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (0.8, 0, 0.9),
                                                     (1.3, 12, 0.6), (1.0, 0, 0.05)])
def test_filters_equal_the_torch_filters_tested_against_hf(temperature, top_k, top_p):
    """mlx_core's filter_logits is equal to HF's warpers (tests/core/test_sampling.py); the jitted
    JAX filters keep the same tokens with the same values (fp32)."""
    import torch

    from mlx_core.models.sampling import filter_logits as torch_filter_logits

    logits = np.random.RandomState(1).randn(4, 300).astype(np.float32) * 3
    got = np.asarray(filter_logits(jnp.asarray(logits), SamplingOptions(temperature, top_k, top_p)))
    want = torch_filter_logits(torch.from_numpy(logits), temperature, top_k, top_p).numpy()
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)


def test_bad_options_are_named_as_the_torch_zoo_names_them():
    with pytest.raises(ValueError, match=r"temperature must be >= 0 \(got -1\).*top_k must be >= 0 "
                                         r"\(got -2\).*top_p must be in \(0, 1\] \(got 1.5\)"):
        SamplingOptions(-1, top_k=-2, top_p=1.5)


@pytest.mark.builtin_model
@pytest.mark.slow
def test_builtin_model_greedy_equals_torch_zoo_on_chat_prompts(builtin_pair):
    torch_model, jax_model, tokenizer = builtin_pair
    for text in ["What is the capital of France?", "Write a haiku about the sea.",
                 "List three primary colors.", "What is 2 + 2?", "Say hello in Spanish."]:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}])
        ref = mlx_core.generate(torch_model, ids, max_new_tokens=24)
        assert generate(jax_model, ids, max_new_tokens=24) == ref, text


def test_stream_equals_generate_and_compiles_one_step(tiny_pair):
    _, _, model = tiny_pair("tiny-gpt2")
    prompt = PROMPTS[0]
    for options in (dict(), dict(temperature=0.9, top_k=30, key=jax.random.key(3))):
        expected = generate(model, prompt, max_new_tokens=10, stop_token_ids=[], **options)
        compiled = generation._step._cache_size()
        streamed = list(stream_generate(model, prompt, max_new_tokens=10, stop_token_ids=[], **options))
        assert streamed == expected
        assert generation._step._cache_size() <= compiled + 1  # one compile, not one per token
    greedy = generate(model, prompt, max_new_tokens=10, stop_token_ids=[])
    stopped = list(stream_generate(model, prompt, max_new_tokens=10, stop_token_ids=[greedy[2]]))
    assert stopped == greedy[:greedy.index(greedy[2]) + 1]
