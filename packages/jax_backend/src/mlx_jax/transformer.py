"""ONE config-driven Flax NNX decoder mirroring the torch zoo's ``Transformer``: Llama 2/3,
Mistral, Qwen2, Qwen3, OLMo 2, Phi-3, Gemma 2 and 3 (text), SmolLM2, GPT-2, Mixtral,
Qwen3-MoE and DeepSeek-V2/V3 (``mla.py``), built from the same ``ModelConfig``.

Attribute names follow the torch module tree (HF's Llama layout), so the flattened NNX state
paths ARE the zoo's parameter names (``model.layers.0.self_attn.q_proj.weight``) and loading is
a strict name-for-name fill.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mlx_core.config import ModelConfig
from mlx_core.rope_scaling import is_length_dependent, rope_attention_factor
from mlx_jax import ops
from mlx_jax.attention import KVCache, build_mask
from mlx_jax.mla import MultiHeadLatentAttention
from mlx_jax.modules import Embedding, Linear, StaticConfig, make_norm
from mlx_jax.moe import SparseMoE, moe_attribute
from mlx_jax.rope import rope_cos_sin, rope_inverse_frequencies, rope_inverse_frequencies_at

HIDDEN_AXES = ("batch", "length", "embed")  # logical axes of activations (mlx_jax.sharding)
LOGITS_AXES = ("batch", "length", "vocab")


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads = config.num_heads, config.kv_heads
        self.head_dim = config.dim_per_head
        h, q, kv = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = Linear(h, q, bias=config.attention_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(h, kv, bias=config.attention_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(h, kv, bias=config.attention_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(q, h, bias=config.attention_out_bias, dtype=dtype, rngs=rngs)
        # queries and keys RMS-normalised before RoPE: per head (Qwen3) or whole (OLMo 2)
        self.qk_norm = config.qk_norm
        if self.qk_norm is not None:
            per_head = self.qk_norm == "head"
            self.q_norm = make_norm(config, dtype, self.head_dim if per_head else q)
            self.k_norm = make_norm(config, dtype, self.head_dim if per_head else kv)
        # a scale other than 1/sqrt(head_dim) (Gemma's query_pre_attn_scalar), in the queries
        self.query_scale = config.attention_scale * self.head_dim**0.5
        self.softcap = config.attn_logit_softcapping

    def __call__(self, x, cos_sin, mask, layer_cache=None):
        """``layer_cache``: (keys, values ``[B, Hkv, S, D]``, write position) or None.
        Returns the output and the updated (keys, values), or None without a cache."""
        b, t, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(b, t, self.num_heads, self.head_dim)
        k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        if cos_sin is not None:
            q, k = ops.rope(q, *cos_sin), ops.rope(k, *cos_sin)
        if self.query_scale != 1.0:
            q = q * jnp.asarray(self.query_scale, q.dtype)
        updated = None
        if layer_cache is not None:
            keys, values, start = layer_cache
            k = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), (0, 0, start, 0))
            v = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), (0, 0, start, 0))
            updated = (k, v)
        out = ops.attention(q, k, v, mask, softcap=self.softcap)
        out = self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, t, self.num_heads * self.head_dim))
        return out, updated


class GatedMLP(nnx.Module):
    """Llama's ``down(silu(gate x) * up x)``; Gemma's with GELU-tanh for SiLU (``geglu``)."""

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(h, i, bias=bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(h, i, bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(i, h, bias=bias, dtype=dtype, rngs=rngs)
        self.gelu = config.mlp_kind == "geglu"

    def __call__(self, x):
        gated = ops.geglu if self.gelu else ops.swiglu
        return self.down_proj(gated(self.gate_proj(x), self.up_proj(x)))


class GeluMLP(nnx.Module):
    """GPT-2's ``down(gelu_tanh(up x))``."""

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.up_proj = Linear(h, i, bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(i, h, bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(ops.gelu_tanh(self.up_proj(x)))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs, layer: int = 0):
        self.placement = config.norm_placement
        if self.placement != "post":
            self.input_layernorm = make_norm(config, dtype)
        self.self_attn = (MultiHeadLatentAttention if config.is_mla else Attention)(
            config, dtype=dtype, rngs=rngs)
        # pre-norm: the MLP's input norm (HF's name for it); post-norm and sandwich: the
        # attention output's
        self.post_attention_layernorm = make_norm(config, dtype)
        if self.placement == "sandwich":  # Gemma: the MLP's input norm
            self.pre_feedforward_layernorm = make_norm(config, dtype)
        if self.placement != "pre":  # OLMo 2, Gemma: the MLP's output normalised before the add
            self.post_feedforward_layernorm = make_norm(config, dtype)
        # One feed-forward, under the name its checkpoints use (Mixtral: block_sparse_moe).
        self.is_moe = config.is_moe_layer(layer)
        self.ff_name = moe_attribute(config) if self.is_moe else "mlp"
        if self.is_moe:
            setattr(self, self.ff_name, SparseMoE(config, dtype=dtype, rngs=rngs))
        elif config.mlp_kind == "gelu":
            self.mlp = GeluMLP(config, dtype=dtype, rngs=rngs)
        else:
            self.mlp = GatedMLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos_sin, mask, layer_cache=None):
        ff = getattr(self, self.ff_name)
        if self.placement == "post":
            attn, updated = self.self_attn(x, cos_sin, mask, layer_cache)
            x = x + self.post_attention_layernorm(attn)
            return x + self.post_feedforward_layernorm(ff(x)), updated
        attn, updated = self.self_attn(self.input_layernorm(x), cos_sin, mask, layer_cache)
        if self.placement == "sandwich":
            x = x + self.post_attention_layernorm(attn)
            return x + self.post_feedforward_layernorm(ff(self.pre_feedforward_layernorm(x))), updated
        x = x + attn
        return x + ff(self.post_attention_layernorm(x)), updated


class Backbone(nnx.Module):
    """Embeddings, decoder layers and the final norm (HF's ``model.`` prefix)."""

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.static_config = StaticConfig(config)
        pad = config.pad_token_id  # as the torch zoo's: no gradient to the pad row from lookups
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs,
                                      padding_idx=pad if pad is not None and 0 <= pad < config.vocab_size
                                      else None, multiplier=config.embedding_multiplier)
        if config.position_kind == "learned":
            self.embed_positions = Embedding(config.max_position_embeddings, config.hidden_size,
                                             dtype=dtype, rngs=rngs)
        self.layers = nnx.List(DecoderLayer(config, dtype=dtype, rngs=rngs, layer=i)
                               for i in range(config.num_layers))
        self.norm = make_norm(config, dtype)
        self.sharder = None  # a mlx_jax.sharding.Sharder: constrains the hidden states' layout

    @property
    def config(self) -> ModelConfig:
        return self.static_config.config

    def _constrain(self, x):
        return x if self.sharder is None else self.sharder.constrain(x, HIDDEN_AXES)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        x = self.embed_tokens(input_ids)
        b, t = input_ids.shape
        new = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        if new.shape != (b, t):
            raise ValueError(f"attention_mask has shape {new.shape}; expected {(b, t)} "
                             f"(the shape of input_ids)")
        if cache is None:
            past, key_valid = 0, new
        else:  # record which new slots are real, then see every slot written so far
            past = cache.length
            key_valid = jax.lax.dynamic_update_slice(cache.key_valid, new, (0, past))
        slots = key_valid.shape[1]
        q_pos = past + jnp.arange(t)
        config = self.config
        windows = [config.layer_window(i) for i in range(config.num_layers)]
        masks = {w: build_mask(key_valid, q_pos, jnp.arange(slots), w) for w in set(windows)}
        if position_ids is None:
            # Positions count real tokens only, so left-padded rows start at 0 (as HF does).
            counted = jnp.maximum(jnp.cumsum(key_valid.astype(jnp.int32), axis=-1) - 1, 0)
            position_ids = jax.lax.dynamic_slice_in_dim(counted, past, t, axis=1)
        tables = {False: None, True: None}  # cos/sin: the model's, the sliding layers' own
        if config.position_kind == "rope":
            inv_freq = rope_inverse_frequencies(config)
            if is_length_dependent(config.rope_scaling):  # HF's: the largest position, plus one
                inv_freq = rope_inverse_frequencies_at(config, (jnp.max(position_ids) + 1).reshape(1))
            tables[False] = rope_cos_sin(inv_freq, position_ids, x.dtype,
                                         rope_attention_factor(config.rope_scaling,
                                                               config.max_position_embeddings))
            tables[True] = tables[False] if config.rope_local_theta is None else rope_cos_sin(
                rope_inverse_frequencies(config, local=True), position_ids, x.dtype)
        else:
            x = x + self.embed_positions(position_ids)
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i], past)
            cos_sin = tables[config.rope_local_theta is not None and config.is_sliding(i)]
            x, updated = layer(self._constrain(x), cos_sin, masks[windows[i]], layer_cache)
            if updated is not None:
                keys.append(updated[0])
                values.append(updated[1])
        x = self._constrain(self.norm(x))
        if cache is None:
            return x, None
        return x, KVCache(tuple(keys), tuple(values), key_valid, cache.length + t)


class Transformer(nnx.Module):
    """A decoder-only language model built from a ``ModelConfig``.

    ``model(input_ids, attention_mask=None)`` returns logits ``[B, T, vocab]`` (fp32 math for
    norms, softmax and rope angles, as the torch zoo); ``model(input_ids, attention_mask,
    labels)`` the torch zoo's mean next-token loss (labels shifted inside, -100 ignored). Given ``cache=`` (a ``KVCache``), it
    returns ``(logits, updated_cache)``: the functional form of the torch zoo's mutable cache.
    """

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.static_config = StaticConfig(config)
        self.model = Backbone(config, dtype=dtype, rngs=rngs)
        # Tied embeddings: no lm_head parameter at all, the embedding matrix is used.
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype,
                                  rngs=rngs)

    @property
    def config(self) -> ModelConfig:
        return self.static_config.config

    def __call__(self, input_ids, attention_mask=None, labels=None, *, position_ids=None,
                 cache: KVCache | None = None):
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T] token ids, got shape {input_ids.shape}")
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask)
        if self.config.position_kind == "learned" and position_ids is None and cache is None \
                and input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"{input_ids.shape[1]} tokens exceed this model's "
                             f"{self.config.max_position_embeddings} learned positions")
        if cache is not None and not isinstance(cache.length, jax.core.Tracer) \
                and int(cache.length) + input_ids.shape[1] > cache.max_length:
            # Under jit the write position is not known; generate() sizes its caches to fit.
            raise ValueError(f"KV cache full: {int(cache.length) + input_ids.shape[1]} tokens do "
                             f"not fit in max_length={cache.max_length}; create the cache with "
                             "a larger max_length")
        hidden, new_cache = self.model(input_ids, attention_mask, position_ids, cache)
        if labels is not None:
            if cache is not None:
                raise ValueError("labels= (a loss) and cache= (generation) do not go together")
            total, count = self.loss_terms(hidden, labels)
            return total / count
        logits = self.logits(hidden)
        if self.model.sharder is not None:
            logits = self.model.sharder.constrain(logits, LOGITS_AXES)
        return logits if cache is None else (logits, new_cache)

    def logits(self, hidden):
        logits = hidden @ self.output_weight().T
        cap = self.config.final_logit_softcapping  # Gemma 2's cap on the output logits
        return logits if cap is None else jnp.tanh(logits / cap) * cap

    def output_weight(self):
        """The ``[vocab, hidden]`` output projection (the embedding matrix when tied)."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight[...]
        return self.lm_head.weight[...]

    def loss_terms(self, hidden, labels, ignore_index: int = -100):
        """The torch zoo's causal-LM loss as ``(sum, count)``: token ``t`` predicts ``labels[t+1]``
        (labels are shifted here), ``ignore_index`` labels count for nothing; the mean loss is
        ``sum / count``. Chunked over tokens: the full logits are never built."""
        labels = jnp.asarray(labels)
        if labels.shape != hidden.shape[:2]:
            raise ValueError(f"labels have shape {tuple(labels.shape)}; expected "
                             f"{tuple(hidden.shape[:2])} (the same as input_ids)")
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        y = labels[:, 1:].reshape(-1).astype(jnp.int32)
        if self.config.final_logit_softcapping is not None:
            # the fused loss takes no cap on the logits: they are built, capped, then scored
            logp = jax.nn.log_softmax(self.logits(h).astype(jnp.float32), axis=-1)
            keep = y != ignore_index
            picked = jnp.take_along_axis(logp, jnp.where(keep, y, 0)[:, None], axis=-1)[:, 0]
            return -(picked * keep).sum(), keep.sum()
        total = ops.fused_linear_cross_entropy(h, self.output_weight(), y, ignore_index=ignore_index,
                                               reduction="sum")
        return total, (y != ignore_index).sum()

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        dtype = self.model.embed_tokens.weight[...].dtype
        return KVCache.create(self.config, batch_size, max_length, dtype)

