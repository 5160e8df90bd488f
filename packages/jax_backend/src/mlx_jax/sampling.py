"""Next-token choice from logits with an explicit PRNG key, as the torch zoo's ``sample_next``:
greedy when ``temperature <= 0``, else temperature, then top-k, then top-p, then sampling."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from mlx_core.sampling_options import sampling_problems


@dataclass(frozen=True)
class SamplingOptions:
    """Hashable, so a jitted loop specialises on it (greedy compiles no sampling code)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        problems = sampling_problems(self.temperature, self.top_p, top_k=self.top_k)
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def filter_logits(logits, options: SamplingOptions):
    """Temperature, top-k and top-p applied to ``logits [B, V]``: removed tokens become -inf."""
    logits = logits.astype(jnp.float32) / options.temperature
    if options.top_k > 0:
        kth = jax.lax.top_k(logits, min(options.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if options.top_p < 1.0:
        order = jnp.argsort(logits, axis=-1)  # ascending, as the torch zoo sorts
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove = (cumulative <= 1 - options.top_p).at[:, -1].set(False)  # keep the most likely
        sorted_logits = jnp.where(remove, -jnp.inf, sorted_logits)
        logits = jnp.zeros_like(logits).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return logits


def sample_next(logits, key, options: SamplingOptions):
    """Next token ids ``[B]`` (int32) from ``logits [B, V]``."""
    if options.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, options), axis=-1).astype(jnp.int32)
