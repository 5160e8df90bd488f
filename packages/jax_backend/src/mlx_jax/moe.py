"""Sparse mixture-of-experts feed-forward, as the torch zoo's (``mlx_core.models.moe``): Mixtral's,
Qwen3-MoE's and DeepSeekMoE's, each expert's layers under the family's checkpoint names.
DeepSeek's routings (``route``: softmax greedy / group_limited_greedy, sigmoid noaux_tc with the
router's ``e_score_correction_bias``, scaled) are ``mlx_core.models.moe_routing``'s in jax.numpy;
its shared experts add a dense gated MLP's output.

Top-k softmax routing (renormalised over the chosen experts unless ``norm_topk_prob`` is
false); the (token, slot) pairs sorted by expert; the experts run as grouped matmuls
(``mlx_kernels.jax.moe_grouped_matmul``: ``jax.lax.ragged_dot``) over the experts' weights
stacked at call time; the outputs put back in (token, slot) order and summed with the routing
weights. Every shape depends on the token count only, so it jits. A LoRA adapter on an expert
(``mlx_jax.lora``) joins its weight as ``W + scaling * B A``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mlx_core.config import ModelConfig
from mlx_jax import ops
from mlx_jax.modules import Linear, StaticConfig
from mlx_kernels.jax import moe_grouped_matmul, sort_by_expert

# each expert's gate, up and down projections, as the family's checkpoints name them
EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}
_LLAMA_NAMES = ("gate_proj", "up_proj", "down_proj")


def moe_attribute(config: ModelConfig) -> str:
    """The decoder layer's name for its MoE feed-forward (as the family's checkpoints have it)."""
    return "block_sparse_moe" if config.model_type == "mixtral" else "mlp"


class Expert(nnx.Module):
    """One gated-SiLU expert: ``down(silu(gate x) * up x)``, its layers named as ``names``."""

    def __init__(self, hidden: int, intermediate: int, names=_LLAMA_NAMES, *, dtype, rngs: nnx.Rngs):
        self.names = names
        gate, up, down = names
        setattr(self, gate, Linear(hidden, intermediate, bias=False, dtype=dtype, rngs=rngs))
        setattr(self, up, Linear(hidden, intermediate, bias=False, dtype=dtype, rngs=rngs))
        setattr(self, down, Linear(intermediate, hidden, bias=False, dtype=dtype, rngs=rngs))

    def projections(self):
        return tuple(getattr(self, name) for name in self.names)

    def __call__(self, x):
        gate, up, down = self.projections()
        return down(ops.swiglu(gate(x), up(x)))


def _weight(layer):
    """A projection's effective weight ``[out, in]``: its own, plus a LoRA adapter's B A."""
    weight = layer.weight[...]
    if getattr(layer, "lora_A", None) is None:
        return weight
    delta = layer.scaling * (layer.lora_B.weight[...].astype(jnp.float32)
                             @ layer.lora_A.weight[...].astype(jnp.float32))
    return (weight.astype(jnp.float32) + delta).astype(weight.dtype)


class Router(Linear):
    """The router (``mlp.gate``), with DeepSeek-V3's bias on the choosing scores: a plain
    ``nnx.Variable`` (loaded and saved, not a trained ``nnx.Param``)."""

    def __init__(self, hidden: int, num_experts: int, *, correction_bias: bool, dtype, rngs):
        super().__init__(hidden, num_experts, bias=False, dtype=dtype, rngs=rngs)
        self.e_score_correction_bias = (nnx.Variable(jnp.zeros((num_experts,), jnp.float32))
                                        if correction_bias else None)


def route(config: ModelConfig, logits, correction_bias=None):
    """``logits [N, E]`` -> ``(weights [N, k] fp32, experts [N, k])`` as ``config`` routes."""
    k = config.num_experts_per_tok
    if (config.scoring_func, config.topk_method, config.routed_scaling_factor) == (
            "softmax", "greedy", 1.0):
        return ops.moe_route(logits, k, config.norm_topk_prob)
    logits = logits.astype(jnp.float32)
    scores = (jax.nn.softmax(logits, axis=-1) if config.scoring_func == "softmax"
              else jax.nn.sigmoid(logits))
    choice = scores if correction_bias is None else scores + correction_bias.astype(jnp.float32)
    if config.topk_method != "greedy":
        n, experts = choice.shape
        grouped = choice.reshape(n, config.n_group, experts // config.n_group)
        if config.topk_method == "noaux_tc":
            group_scores, fill = jax.lax.top_k(grouped, 2)[0].sum(-1), -jnp.inf
        else:
            group_scores, fill = grouped.max(-1), 0.0
        best = jax.lax.top_k(group_scores, config.topk_group)[1]
        keep = jnp.zeros(group_scores.shape, bool).at[jnp.arange(n)[:, None], best].set(True)
        choice = jnp.where(keep[..., None], grouped, fill).reshape(n, experts)
    chosen = jax.lax.top_k(jax.lax.stop_gradient(choice), k)[1]
    weights = jnp.take_along_axis(scores, chosen, axis=-1)
    if config.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * config.routed_scaling_factor, chosen


class SparseMoE(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.static_config = StaticConfig(config)
        self.top_k = config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob
        self.gate = Router(config.hidden_size, config.num_experts,
                           correction_bias=config.topk_method == "noaux_tc", dtype=dtype, rngs=rngs)
        names = EXPERT_NAMES.get(config.model_type, _LLAMA_NAMES)
        self.experts = nnx.List(
            Expert(config.hidden_size, config.expert_intermediate_size, names, dtype=dtype, rngs=rngs)
            for _ in range(config.num_experts)
        )
        self.shared_experts = (Expert(config.hidden_size,
                                      config.expert_intermediate_size * config.n_shared_experts,
                                      dtype=dtype, rngs=rngs)
                               if config.n_shared_experts else None)

    def __call__(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        bias = self.gate.e_score_correction_bias
        weights, chosen = route(self.static_config.config, self.gate(flat),
                                None if bias is None else bias[...])  # [N, k] each
        order, offsets = sort_by_expert(chosen, len(self.experts))
        rows = flat[order // self.top_k]  # row i: the token of pair order[i], grouped by expert
        layers = [expert.projections() for expert in self.experts]
        gate_up = jnp.stack([jnp.concatenate([_weight(g), _weight(u)]) for g, u, _ in layers])
        down = jnp.stack([_weight(d) for *_, d in layers])
        gate, up = jnp.split(moe_grouped_matmul(rows, gate_up, offsets), 2, axis=-1)
        out = moe_grouped_matmul(ops.swiglu(gate, up), down, offsets)
        out = jnp.zeros_like(out).at[order].set(out)  # back in (token, slot) order
        combined = (out.reshape(-1, self.top_k, shape[-1]) * weights[..., None]).sum(axis=1)
        combined = combined.astype(x.dtype).reshape(shape)
        return combined if self.shared_experts is None else combined + self.shared_experts(x)
