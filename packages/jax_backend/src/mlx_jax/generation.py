"""Jitted generation with a static KV cache: one compiled prefill, one compiled decode loop.

Prompts are left-padded to a bucketed length (a power of two), and ``max_new_tokens`` is
bucketed likewise for the cache and output sizes, so similar requests reuse the compiled
programs; the decode loop is a ``lax.while_loop`` over fixed-shape arrays, so no token triggers
a recompilation. Greedy output
equals the torch zoo's ``mlx_core.generate`` (the same left padding, positions and masks).
Phi-3 with LongRoPE computes every token again at the step HF's Phi-3 generation does
(``mlx_core.rope_scaling.recompute_length``): the loop stops there, one more prefill runs over
the prompts and the tokens so far, and the loop goes on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlx_core.rope_scaling import recompute_length
from mlx_jax.attention import KVCache
from mlx_jax.sampling import SamplingOptions, sample_next

MIN_BUCKET = 16


def bucket_length(n: int, minimum: int = MIN_BUCKET) -> int:
    """The padded length for ``n`` tokens: the next power of two, at least ``minimum``."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@partial(jax.jit, static_argnums=0)
def _prefill(graphdef, state, ids, mask, cache):
    model = nnx.merge(graphdef, state)
    hidden, cache = model.model(ids, mask, None, cache)
    return model.logits(hidden[:, -1]), cache


@partial(jax.jit, static_argnums=(0, 1, 2))
def _decode(graphdef, capacity: int, options: SamplingOptions, state, logits, cache, key, stops,
            max_new_tokens):
    """Sample, feed back, repeat; stops after ``max_new_tokens`` (traced, at most the static
    ``capacity``, so nearby lengths share one compile) or once every row met a stop token."""
    batch = logits.shape[0]
    out = jnp.full((batch, capacity), -1, jnp.int32)
    carry = (jnp.int32(0), logits, cache, key, jnp.zeros(batch, bool), out)
    return _loop(graphdef, options, state, carry, stops, max_new_tokens)


def _loop(graphdef, options: SamplingOptions, state, carry, stops, max_new_tokens):
    """The decode loop from ``carry``: ``(step, logits, cache, key, finished, out)``, returned
    as it ends (``out [B, capacity]``: the tokens, -1 after a row's stop)."""

    def keep_going(carry):
        step, _, _, _, finished, _ = carry
        return (step < max_new_tokens) & ~finished.all()

    def step_once(carry):
        step, logits, cache, key, finished, out = carry
        key, sub = jax.random.split(key)
        token = sample_next(logits, sub, options)
        out = out.at[:, step].set(jnp.where(finished, -1, token))
        finished = finished | jnp.isin(token, stops)
        model = nnx.merge(graphdef, state)
        hidden, cache = model.model(token[:, None], None, None, cache)
        return step + 1, model.logits(hidden[:, -1]), cache, key, finished, out

    return jax.lax.while_loop(keep_going, step_once, carry)


_decode_from = jax.jit(_loop, static_argnums=(0, 1))  # the loop from a given carry


@partial(jax.jit, static_argnums=(0, 1))
def _step(graphdef, options: SamplingOptions, state, logits, cache, key):
    """One token for streaming: sample from ``logits``, feed it back; fixed shapes, one compile."""
    key, sub = jax.random.split(key)
    token = sample_next(logits, sub, options)
    model = nnx.merge(graphdef, state)
    hidden, cache = model.model(token[:, None], None, None, cache)
    return token, model.logits(hidden[:, -1]), cache, key


def _stop_ids(config, stop_token_ids) -> list[int]:
    if stop_token_ids is None:
        stop_token_ids = config.eos_token_id
    if stop_token_ids is None:
        return []
    return [stop_token_ids] if isinstance(stop_token_ids, int) else list(stop_token_ids)


def _start(model, prompts, max_new_tokens, temperature, top_k, top_p, key, seed):
    """Check options, left-pad the prompts to their bucket and run the prefill."""
    options = SamplingOptions(temperature, top_k, top_p)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if key is None:
        if not options.greedy and seed is None:
            raise ValueError("sampling (temperature > 0) needs an explicit PRNG key= or seed=")
        key = jax.random.key(seed or 0)
    config = model.config
    longest = max(len(p) for p in prompts)
    if config.position_kind == "learned" and longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds this "
                         f"model's {config.max_position_embeddings} learned positions")
    width = bucket_length(longest)
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = True
    cache = model.new_cache(len(prompts), width + bucket_length(max_new_tokens))
    graphdef, state = nnx.split(model)
    logits, cache = _prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), cache)
    return options, graphdef, state, logits, cache, key, ids, mask


def _recompute_step(model, prompts, max_new_tokens) -> int | None:
    """The step whose fed token HF's Phi-3 generation computes with all the others again
    (LongRoPE: the cache, one slot per token of the longest prompt and per step, holds
    ``original_max_position_embeddings``); None: no such step in this generation."""
    switch = recompute_length(model.config.model_type, model.config.rope_scaling,
                              model.config.max_position_embeddings)
    step = None if switch is None else switch - max(len(p) for p in prompts)
    return step if step is not None and 0 <= step < max_new_tokens - 1 else None


def _recompute(model, graphdef, state, ids, mask, tokens, capacity):
    """A prefill over the padded prompts and the ``tokens [B, n]`` fed so far, into a new
    cache of ``capacity`` slots: the logits after them and that cache."""
    ids = np.concatenate([ids, np.maximum(np.asarray(tokens), 0)], axis=1)  # -1: a row's end
    mask = np.concatenate([mask, np.ones(np.shape(tokens), bool)], axis=1)
    cache = model.new_cache(ids.shape[0], capacity)
    return _prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), cache)


def generate_tokens(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    key: jax.Array | None = None, seed: int | None = None,
                    stop_token_ids=None) -> np.ndarray:
    """New tokens ``[B, max_new_tokens]`` (-1 after a row's stop token and past an early end)."""
    options, graphdef, state, logits, cache, key, ids, mask = _start(
        model, prompts, max_new_tokens, temperature, top_k, top_p, key, seed)
    stops = jnp.asarray(_stop_ids(model.config, stop_token_ids) or [-1], jnp.int32)
    switch = _recompute_step(model, prompts, max_new_tokens)
    carry = _decode(graphdef, bucket_length(max_new_tokens), options, state, logits, cache, key,
                    stops, jnp.int32(max_new_tokens if switch is None else switch + 1))
    if switch is not None and int(carry[0]) == switch + 1:  # not every row stopped before
        step, _, cache, key, finished, out = carry
        logits, cache = _recompute(model, graphdef, state, ids, mask, out[:, :switch + 1],
                                   cache.max_length)
        carry = _decode_from(graphdef, options, state, (step, logits, cache, key, finished, out),
                             stops, jnp.int32(max_new_tokens))
    return np.asarray(carry[-1])[:, :max_new_tokens]


def stream_generate(model, prompt_ids: Sequence[int], *, max_new_tokens: int = 128,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    key: jax.Array | None = None, seed: int | None = None,
                    stop_token_ids=None) -> Iterator[int]:
    """Yield new token ids one at a time (the stop token, if reached, is the last one); the
    same tokens as ``generate`` with the same options and key."""
    options, graphdef, state, logits, cache, key, ids, mask = _start(
        model, [list(prompt_ids)], max_new_tokens, temperature, top_k, top_p, key, seed)
    stops = set(_stop_ids(model.config, stop_token_ids))
    switch, tokens = _recompute_step(model, [prompt_ids], max_new_tokens), []
    for step in range(max_new_tokens):
        token, logits, cache, key = _step(graphdef, options, state, logits, cache, key)
        tokens.append(int(token[0]))
        yield tokens[-1]
        if tokens[-1] in stops:
            return
        if step == switch:  # every token again (the step's own forward is dropped)
            logits, cache = _recompute(model, graphdef, state, ids, mask, [tokens], cache.max_length)


def generate(model, prompts: Sequence[int] | Sequence[Sequence[int]], **options):
    """New token ids for one prompt (``list[int]`` -> ``list[int]``) or a batch of prompts.

    Options: ``max_new_tokens=128, temperature=0.0 (greedy), top_k=0, top_p=1.0, key=None``
    (a ``jax.random.key``; or ``seed=``; sampling needs one), ``stop_token_ids=None`` (None: the
    model's eos ids). A row's stop token, if reached, is its last token.
    """
    single = len(prompts) > 0 and isinstance(prompts[0], (int, np.integer))
    batch = [list(prompts)] if single else [list(p) for p in prompts]
    tokens = generate_tokens(model, batch, **options)
    out = [[int(t) for t in row if t >= 0] for row in tokens]
    return out[0] if single else out


__all__ = ["KVCache", "bucket_length", "generate", "generate_tokens", "stream_generate"]
