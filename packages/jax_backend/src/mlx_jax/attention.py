"""Attention with a causal / sliding-window / key-padding mask, and a static KV cache.

The cache is a pytree of fixed-shape arrays, so a jitted decode step never changes shape (no
recompilation per token): per layer, keys/values ``[B, kv_heads, max_length, head_dim]`` (one
array each, so a layer's write updates its own buffer in place instead of copying a stacked
``[layers, ...]`` array), which slots hold real tokens ``key_valid [B, max_length]`` and the
shared write position ``length``.
Positions and masks count cache slots exactly as the torch zoo's ``build_mask`` does; the
attention itself is ``mlx_kernels.jax.attention`` (``mlx_jax.ops``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mlx_core.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    keys: tuple[jax.Array, ...]  # one [B, kv_heads, max_length, head_dim] per layer
    values: tuple[jax.Array, ...]
    key_valid: jax.Array
    length: jax.Array  # int32 scalar: slots written so far

    @classmethod
    def create(cls, config: ModelConfig, batch_size: int, max_length: int, dtype=jnp.float32):
        shape = (batch_size, config.kv_heads, max_length, config.dim_per_head)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
        values = zeros
        if config.is_mla:  # the latent as "keys", the shared rope key part as "values"
            zeros = tuple(jnp.zeros((batch_size, 1, max_length, config.kv_lora_rank), dtype)
                          for _ in range(config.num_layers))
            values = tuple(jnp.zeros((batch_size, 1, max_length, config.qk_rope_head_dim), dtype)
                           for _ in range(config.num_layers))
        return cls(zeros, values, jnp.zeros((batch_size, max_length), bool),
                   jnp.zeros((), jnp.int32))

    @property
    def max_length(self) -> int:
        return self.key_valid.shape[1]


def build_mask(key_valid, q_pos, k_pos, window: int | None):
    """bool ``[B, 1, T, S]`` (True: may attend) for queries at ``q_pos [T]`` over keys at
    ``k_pos [S]``; ``key_valid [B, S]`` marks real (not padding, already written) keys."""
    q, k = q_pos[:, None], k_pos[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (q - k < window)
    mask = allowed[None, None] & key_valid[:, None, None, :]
    # A query that sees no key (a left-padding row) attends to itself, as in the torch zoo:
    # an all -inf row would be NaN, and NaN leaks through later layers.
    return mask | (k == q)[None, None]
