"""Layers whose parameters carry torch's names and layouts (``weight [out, in]``, ``bias``).

Keeping torch's layout means an HF checkpoint maps onto the Flax model by name alone, with no
per-layer transposes; the matmul is written ``x @ weight.T``, which XLA fuses the same way.
Initialisation follows the torch zoo's ``reset_parameters``: normal(0, 0.02), zero biases,
unit norms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mlx_jax import ops

INIT_STD = 0.02


class Linear(nnx.Module):
    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(
            INIT_STD * jax.random.normal(rngs.params(), (out_features, in_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

    def __call__(self, x):
        y = x @ self.weight[...].T
        return y if self.bias is None else y + self.bias[...]

    @classmethod
    def of(cls, weight: nnx.Param, bias: nnx.Param | None = None) -> Linear:
        """A ``Linear`` holding these Params (built abstractly: no random init)."""
        out_features, in_features = weight[...].shape
        linear = nnx.eval_shape(lambda: cls(in_features, out_features, bias=False,
                                            dtype=weight[...].dtype, rngs=nnx.Rngs(0)))
        linear.weight, linear.bias = weight, bias
        return linear


class Embedding(nnx.Module):
    """A lookup table; ``padding_idx`` (the pad token, as torch's and HF's): its row starts at
    zero and takes no gradient from lookups; ``multiplier``: looked-up rows times it, rounded to
    their dtype (Gemma's sqrt(hidden_size), as the torch zoo's ``ScaledEmbedding``)."""

    def __init__(self, num: int, features: int, *, dtype, rngs: nnx.Rngs,
                 padding_idx: int | None = None, multiplier: float | None = None):
        self.multiplier = multiplier
        weight = INIT_STD * jax.random.normal(rngs.params(), (num, features), dtype)
        if padding_idx is not None:
            weight = weight.at[padding_idx].set(0)
        self.weight = nnx.Param(weight)
        self.padding_idx = padding_idx

    def __call__(self, ids):
        weight = self.weight[...]
        if self.padding_idx is not None:
            weight = weight.at[self.padding_idx].set(jax.lax.stop_gradient(weight[self.padding_idx]))
        rows = jnp.take(weight, ids, axis=0)
        return rows if self.multiplier is None else rows * jnp.asarray(self.multiplier, rows.dtype)


class RMSNorm(nnx.Module):
    """Scales by ``weight``, or by ``offset + weight`` (Gemma: 1 + weight, from zero)."""

    def __init__(self, features: int, eps: float, *, dtype, offset: float = 0.0):
        self.weight = nnx.Param(jnp.full((features,), 1.0 - offset, dtype))
        self.eps = eps
        self.offset = offset

    def __call__(self, x):
        if self.offset:  # normalised and scaled in fp32, then cast (as the torch zoo's)
            scale = self.weight[...].astype(jnp.float32) + self.offset
            return ops.rms_norm(x.astype(jnp.float32), scale, self.eps).astype(x.dtype)
        return ops.rms_norm(x, self.weight[...], self.eps)


class LayerNorm(nnx.Module):
    def __init__(self, features: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.ones((features,), dtype))
        self.bias = nnx.Param(jnp.zeros((features,), dtype))
        self.eps = eps

    def __call__(self, x):
        return ops.layer_norm(x, self.weight[...], self.bias[...], self.eps)


def make_norm(config, dtype, size: int | None = None) -> RMSNorm | LayerNorm:
    if config.norm_kind == "rms":
        return RMSNorm(size or config.hidden_size, config.norm_eps, dtype=dtype,
                       offset=config.norm_weight_offset)
    return LayerNorm(size or config.hidden_size, config.norm_eps, dtype=dtype)


class StaticConfig:
    """A ``ModelConfig`` as a static (graph) attribute. jit hashes a model's static attributes
    and ``ModelConfig`` holds dicts (``rope_scaling``, ``extra``), so this compares by JSON."""

    def __init__(self, config):
        self.config = config
        self._key = config.to_json()

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other) -> bool:
        return isinstance(other, StaticConfig) and other._key == self._key

    def __repr__(self) -> str:
        return f"StaticConfig({self.config!r})"
