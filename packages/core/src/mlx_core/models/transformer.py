"""ONE config-driven decoder for every family: Llama 2/3, Mistral, Qwen2, Qwen3, OLMo 2,
Phi-3, Gemma 2 and 3 (text), SmolLM2, GPT-2, Mixtral, Qwen3-MoE, DeepSeek-V2/V3.

Module and parameter names follow HF's Llama layout (``model.layers.0.self_attn.q_proj.weight``)
so Llama-family checkpoints and PEFT adapters map with no renaming; MoE layers use their
family's checkpoint names (Mixtral's ``block_sparse_moe.experts.0.w1``, Qwen3-MoE's
``mlp.experts.0.gate_proj``); GPT-2 maps through ``checkpoint.py``. DeepSeek's multi-head
latent attention is ``mla.py``'s module under HF's names, selected by ``attention_kind``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.utils.checkpoint
from torch import nn

from mlx_core.config import ModelConfig
from mlx_core.models.attention import AttentionMetadata, KVCache, attend, build_mask
from mlx_core.models.linear import Linear
from mlx_core.models.mla import MultiHeadLatentAttention
from mlx_core.models.moe import SparseMoE, moe_attribute
from mlx_core.models.recompute import run_checkpointed_layer
from mlx_core.models.rope import (
    rope_cos_sin,
    rope_inverse_frequencies,
    rope_inverse_frequencies_at,
    rope_long_inverse_frequencies,
)
from mlx_core.rope_scaling import is_length_dependent, rope_attention_factor, rope_type
from mlx_kernels import fused_linear_cross_entropy, geglu, gelu_tanh, rms_norm, rope, swiglu


class RMSNorm(nn.Module):
    """Scales by ``weight`` (Llama), or by ``offset + weight`` (Gemma: 1 + weight, the weight
    starting at zero)."""

    def __init__(self, hidden: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((hidden,), 1.0 - offset))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.offset:
            # Gemma's order: normalised and scaled in fp32, then cast (HF's Gemma3RMSNorm)
            scale = self.weight.float() + self.offset
            return rms_norm(x.float(), scale, self.eps).to(x.dtype)
        return rms_norm(x, self.weight, self.eps)


def make_norm(config: ModelConfig, size: int | None = None) -> nn.Module:
    if config.norm_kind == "rms":
        return RMSNorm(size or config.hidden_size, config.norm_eps, config.norm_weight_offset)
    return nn.LayerNorm(size or config.hidden_size, eps=config.norm_eps)


class ScaledEmbedding(nn.Embedding):
    """Embeddings times ``multiplier`` rounded to the weight's dtype (Gemma's sqrt(hidden_size),
    as HF's ``Gemma3TextScaledWordEmbedding``); part of the module, so every caller of
    ``embed_tokens`` (prompt tuning included) sees the scaled vectors."""

    def __init__(self, *args, multiplier: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.multiplier = multiplier

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(input_ids)
        return out * torch.tensor(self.multiplier, dtype=out.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads = config.num_heads, config.kv_heads
        self.head_dim = config.dim_per_head
        h, q, kv = config.hidden_size, config.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = Linear(h, q, bias=config.attention_bias)
        self.k_proj = Linear(h, kv, bias=config.attention_bias)
        self.v_proj = Linear(h, kv, bias=config.attention_bias)
        self.o_proj = Linear(q, h, bias=config.attention_out_bias)
        # queries and keys RMS-normalised before RoPE: per head (Qwen3) or whole (OLMo 2)
        self.qk_norm = config.qk_norm
        if self.qk_norm is not None:
            per_head = self.qk_norm == "head"
            self.q_norm = make_norm(config, self.head_dim if per_head else q)
            self.k_norm = make_norm(config, self.head_dim if per_head else kv)
        # a scale other than 1/sqrt(head_dim) (Gemma's query_pre_attn_scalar) goes into the
        # queries, so every attention path (SDPA, paged, varlen kernels) runs unchanged
        self.query_scale = config.attention_scale * self.head_dim**0.5
        self.softcap = config.attn_logit_softcapping

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The queries, keys and values: three projections of ``x`` (one GEMM once
        ``mlx_core.transforms.fuse_projections`` has fused them)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos_sin, meta: AttentionMetadata) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.project(x)
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cos_sin is not None:
            q, k = rope(q, *cos_sin), rope(k, *cos_sin)
        if self.query_scale != 1.0:
            q = q * self.query_scale
        out = attend(q, k, v, meta, self.layer, self.softcap)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class GatedMLP(nn.Module):
    """Llama's ``down(silu(gate x) * up x)``; Gemma's with GELU-tanh for SiLU (``geglu``)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(h, i, bias=bias)
        self.up_proj = Linear(h, i, bias=bias)
        self.down_proj = Linear(i, h, bias=bias)
        self.gated = geglu if config.mlp_kind == "geglu" else swiglu

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate and up projections of ``x`` (one GEMM once fused, as ``Attention.project``)."""
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x):
        gate, up = self.project(x)
        return self.down_proj(self.gated(gate, up))


class GeluMLP(nn.Module):
    """GPT-2's ``down(gelu_tanh(up x))``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.up_proj = Linear(h, i, bias=bias)
        self.down_proj = Linear(i, h, bias=bias)

    def forward(self, x):
        return self.down_proj(gelu_tanh(self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.placement = config.norm_placement
        if self.placement != "post":
            self.input_layernorm = make_norm(config)
        # DeepSeek-V2/V3: multi-head latent attention
        self.self_attn = (MultiHeadLatentAttention if config.is_mla else Attention)(config, layer)
        # pre-norm: the MLP's input norm (HF's name for it); post-norm and sandwich: the
        # attention output's
        self.post_attention_layernorm = make_norm(config)
        if self.placement == "sandwich":  # Gemma: the MLP's input norm
            self.pre_feedforward_layernorm = make_norm(config)
        if self.placement != "pre":  # OLMo 2, Gemma: the MLP's output normalised before the add
            self.post_feedforward_layernorm = make_norm(config)
        # the feed-forward, under the name its checkpoints use (Mixtral: block_sparse_moe)
        self.is_moe = config.is_moe_layer(layer)
        self.ff_name = moe_attribute(config) if self.is_moe else "mlp"
        if self.is_moe:
            setattr(self, self.ff_name, SparseMoE(config))
        else:
            self.mlp = GeluMLP(config) if config.mlp_kind == "gelu" else GatedMLP(config)

    def forward(self, x, cos_sin, meta):
        ff = getattr(self, self.ff_name)
        if self.placement == "post":
            x = x + self.post_attention_layernorm(self.self_attn(x, cos_sin, meta))
            return x + self.post_feedforward_layernorm(ff(x))
        attended = self.normed_into(self.input_layernorm, x,
                                    lambda h: self.self_attn(h, cos_sin, meta))
        if self.placement == "sandwich":
            x = x + self.post_attention_layernorm(attended)
            return x + self.post_feedforward_layernorm(
                self.normed_into(self.pre_feedforward_layernorm, x, ff))
        x = x + attended
        return x + self.normed_into(self.post_attention_layernorm, x, ff)

    def normed_into(self, norm: nn.Module, x: torch.Tensor, block) -> torch.Tensor:
        """``block(norm(x))`` (``mlx_core.transforms.selective_recompute`` rebuilds the norm's
        output in backward instead of keeping it)."""
        return block(norm(x))


class Backbone(nn.Module):
    """Embeddings, decoder layers and the final norm (HF's ``model.`` prefix)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # HF's padding_idx: the pad token's row gets no gradient from lookups (and starts at 0)
        pad = config.pad_token_id
        padding_idx = pad if pad is not None and 0 <= pad < config.vocab_size else None
        if config.embedding_multiplier is None:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                             padding_idx=padding_idx)
        else:
            self.embed_tokens = ScaledEmbedding(config.vocab_size, config.hidden_size,
                                                padding_idx=padding_idx,
                                                multiplier=config.embedding_multiplier)
        if config.position_kind == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = make_norm(config)
        self.gradient_checkpointing = False  # recompute layers in backward (training only)
        self.checkpoint_layers: int | None = None  # how many (the first ones); None: all
        # A plain attribute, not a buffer: it is derived from the config, never saved or loaded.
        self.rope_inv_freq = (
            rope_inverse_frequencies(config) if config.position_kind == "rope" else None
        )
        # per layer: its attention window (None: all keys) and whether it takes the sliding
        # layers' own RoPE (Gemma 3)
        self.layer_windows = [config.layer_window(i) for i in range(config.num_layers)]
        self.rope_local_inv_freq = (
            rope_inverse_frequencies(config, local=True)
            if config.position_kind == "rope" and config.rope_local_theta is not None else None
        )
        self.layer_local_rope = [self.rope_local_inv_freq is not None and config.is_sliding(i)
                                 for i in range(config.num_layers)]
        self.rope_attention_factor = rope_attention_factor(config.rope_scaling,
                                                           config.max_position_embeddings)
        # dynamic NTK, LongRoPE: the table depends on the sequence's length (rope_tables)
        self.rope_length_dependent = (config.position_kind == "rope"
                                      and is_length_dependent(config.rope_scaling))
        self.rope_long_inv_freq = (
            rope_long_inverse_frequencies(config) if self.rope_length_dependent
            and rope_type(config.rope_scaling) == "longrope" else None)

    def rope_tables(self, position_ids: torch.Tensor, dtype: torch.dtype,
                    seq_lens: torch.Tensor | None = None) -> dict:
        """cos/sin for ``position_ids``: ``{False: the model's, True: the sliding layers' own}``
        (the same tables when there is no local RoPE). A length-dependent scaling (dynamic NTK,
        LongRoPE) takes the table of ``seq_lens`` (per token, as ``position_ids``), or, as HF
        does, of the largest position in ``position_ids`` plus one."""
        device = position_ids.device
        if self.rope_inv_freq.device != device:  # moved once, not at every (compiled) step
            self.rope_inv_freq = self.rope_inv_freq.to(device)
        inv_freq = self.rope_inv_freq
        if self.rope_length_dependent:
            if self.rope_long_inv_freq is not None and self.rope_long_inv_freq.device != device:
                self.rope_long_inv_freq = self.rope_long_inv_freq.to(device)
            seq_lens = (position_ids.max() + 1).reshape(1) if seq_lens is None else seq_lens[..., None]
            inv_freq = rope_inverse_frequencies_at(self.config, inv_freq, self.rope_long_inv_freq,
                                                   seq_lens)
        tables = {False: rope_cos_sin(inv_freq, position_ids, dtype, self.rope_attention_factor)}
        if self.rope_local_inv_freq is not None:
            if self.rope_local_inv_freq.device != device:
                self.rope_local_inv_freq = self.rope_local_inv_freq.to(device)
            tables[True] = rope_cos_sin(self.rope_local_inv_freq, position_ids, dtype)
        else:
            tables[True] = tables[False]
        return tables

    def layer_inputs(self, tables: dict | None, metas: dict):
        """Each layer's ``(cos_sin, meta)``, from the RoPE tables (``rope_tables``; None for
        learned positions) and the attention metadata per window (``{window: meta}``)."""
        for i, window in enumerate(self.layer_windows):
            yield (None if tables is None else tables[self.layer_local_rope[i]]), metas[window]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                cache: KVCache | None = None, inputs_embeds=None, paged=None):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids [B, T] and inputs_embeds [B, T, H]")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t, device = x.shape[0], x.shape[1], x.device
        windows = set(self.layer_windows)
        if paged is not None:  # the serving layout: packed row, positions given by the runner
            if position_ids is None or b != 1:
                raise ValueError("paged attention takes one packed row [1, T] and its position_ids")
            metas = {w: paged if w == paged.sliding_window
                     else dataclasses.replace(paged, sliding_window=w) for w in windows}
        else:
            past = cache.length if cache is not None else 0
            key_valid = _key_valid(attention_mask, b, t, past, cache, device)
            if position_ids is None:
                position_ids = _default_positions(key_valid, b, t, past, device)
            metas = {w: AttentionMetadata(build_mask(key_valid, t, past, w, device), cache)
                     for w in windows}
        tables = None
        if self.rope_inv_freq is not None:
            seq_lens = None
            if paged is not None and self.rope_length_dependent:
                seq_lens = paged.rope_lengths
                if seq_lens is None:  # the packed row's largest position is not a sequence's
                    raise ValueError(
                        f"a paged forward of a model with {rope_type(self.config.rope_scaling)}"
                        " RoPE scaling needs PagedAttentionMetadata.rope_lengths (each token's "
                        "sequence length)")
            tables = self.rope_tables(position_ids, x.dtype, seq_lens)
        else:
            if int(position_ids.max()) >= self.config.max_position_embeddings:
                raise ValueError(
                    f"position {int(position_ids.max())} is past max_position_embeddings="
                    f"{self.config.max_position_embeddings} of this model (learned positions)"
                )
            x = x + self.embed_positions(position_ids)
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        n_checkpointed = len(self.layers) if self.checkpoint_layers is None else self.checkpoint_layers
        for i, (layer, (cos_sin, meta)) in enumerate(zip(self.layers, self.layer_inputs(tables, metas),
                                                          strict=True)):
            if checkpointed and i < n_checkpointed:
                x = torch.utils.checkpoint.checkpoint(run_checkpointed_layer, layer, x, cos_sin, meta,
                                                      use_reentrant=False)
            else:
                x = layer(x, cos_sin, meta)
        if cache is not None:
            cache.advance(t)
        return self.norm(x)


def _key_valid(attention_mask, b, t, past, cache, device) -> torch.Tensor | None:
    """bool ``[B, past + T]``: which keys are real tokens, or None when all are."""
    if attention_mask is not None:
        attention_mask = attention_mask.to(device=device, dtype=torch.bool)
        if attention_mask.shape not in ((b, t), (b, past + t)):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected ({b}, {t}) "
                f"or ({b}, {past + t}) for input_ids ({b}, {t}) after {past} cached tokens"
            )
        attention_mask = attention_mask[:, -t:]
    if cache is None:
        return None if attention_mask is None or bool(attention_mask.all()) else attention_mask
    new = attention_mask if attention_mask is not None else torch.ones(b, t, dtype=torch.bool, device=device)
    cache.append_mask(new)
    valid = cache.key_valid[:, : past + t]
    return None if bool(valid.all()) else valid


def _default_positions(key_valid, b, t, past, device) -> torch.Tensor:
    """Positions count real tokens only, so left-padded rows start at 0 (as HF generate does)."""
    if key_valid is None:
        return torch.arange(past, past + t, device=device).expand(b, t)
    return (key_valid.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]


class Transformer(nn.Module):
    """A decoder-only language model built from a ``ModelConfig``.

    ``forward(input_ids, attention_mask=None, labels=None)`` returns logits ``[B, T, vocab]``, or,
    given ``labels``, the mean next-token loss (labels shifted inside, -100 ignored) computed
    with the fused linear cross-entropy, so the full logits are never built.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        # a quantized model (mlx_core.transforms) keeps its own tying
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (its final norm's), quantized or not."""
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def reset_parameters(self, std: float = 0.02) -> None:
        """HF-style init: normal(0, std) weights (the pad token's embedding zero), zero biases,
        unit norms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
                if getattr(module, "padding_idx", None) is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
            elif isinstance(module, RMSNorm):
                nn.init.constant_(module.weight, 1.0 - module.offset)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        self.tie_weights()

    def gradient_checkpointing_enable(self, enable: bool = True, num_layers: int | None = None) -> None:
        """Keep only a layer's input in training and recompute the layer in backward.

        ``num_layers``: checkpoint only the first N decoder layers (Megatron's "block" recompute)
        and keep the others' activations: memory between none and full checkpointing, and the
        recompute cost of N layers instead of all. ``None``: every layer."""
        total = len(self.model.layers)
        if num_layers is not None and not 0 <= num_layers <= total:
            raise ValueError(f"num_layers={num_layers}: this model has {total} decoder layers; "
                             f"pass 0..{total}, or None to checkpoint them all")
        self.model.gradient_checkpointing = enable
        self.model.checkpoint_layers = num_layers

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        return KVCache(self.config, batch_size, max_length, dtype=self.dtype, device=self.device)

    def forward(self, input_ids=None, attention_mask=None, labels=None, *, inputs_embeds=None,
                position_ids=None, kv_cache: KVCache | None = None, logits_to_keep: int | torch.Tensor = 0,
                paged=None):
        """``inputs_embeds [B, T, H]`` replaces ``input_ids`` (e.g. for prompt tuning);
        ``logits_to_keep`` (as in HF): an int ``n > 0`` computes logits for only the last ``n``
        positions, a 1-D index tensor for only those positions;
        ``paged`` (a ``PagedAttentionMetadata``) runs packed sequences over a paged cache."""
        hidden = self.model(input_ids, attention_mask, position_ids, kv_cache, inputs_embeds, paged)
        if labels is not None:
            return self.loss(hidden, labels)
        if isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        elif logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.capped(self.lm_head(hidden))

    def capped(self, logits: torch.Tensor) -> torch.Tensor:
        """The output logits, soft-capped where the config says so (Gemma 2)."""
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if labels.shape != hidden.shape[:2]:
            raise ValueError(
                f"labels have shape {tuple(labels.shape)}; expected {tuple(hidden.shape[:2])} "
                "(the same as input_ids)"
            )
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        y = labels[:, 1:].reshape(-1).to(h.device)
        if self.config.final_logit_softcapping is not None:
            # the fused loss takes no cap on the logits: they are built, capped, then scored
            logits = self.capped(self.lm_head(h)).float()
            return torch.nn.functional.cross_entropy(logits, y, ignore_index=-100)
        head = self.lm_head
        weight = head.weight if isinstance(head, nn.Linear) else head.dequantized_weight()
        return fused_linear_cross_entropy(h, weight, y, bias=head.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def build_transformer(config: ModelConfig) -> Transformer:
    return Transformer(config)


__all__ = ["Transformer", "KVCache", "build_transformer"]
