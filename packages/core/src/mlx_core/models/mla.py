"""Multi-head latent attention (DeepSeek-V2/V3's MLA): the zoo's attention for
``config.attention_kind == "mla"``, under HF's module and parameter names
(``self_attn.q_a_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``, ...).

Queries come from the hidden state (``q_proj``), or through a normed low-rank bottleneck
(``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj``) when ``q_lora_rank`` is set. Keys and values
come from one normed latent of ``kv_lora_rank`` (``kv_a_proj_with_mqa``'s first part) expanded per
head by ``kv_b_proj``; each head's key is its expanded ``qk_nope_head_dim`` part followed by a
``qk_rope_head_dim`` part that all heads share (``kv_a_proj_with_mqa``'s last part). RoPE turns
the rope parts only; DeepSeek's checkpoints lay those out as interleaved pairs ``(x0, x1), (x2,
x3), ...`` (``rope_interleave``), which are taken apart (evens, then odds) before the usual
half-split rotation: the same dot products, as queries and keys get the same layout. The softmax
scale is ``qk_head_dim ** -0.5`` times YaRN's mscale squared (``ModelConfig.attention_scale``).

The contiguous ``KVCache`` holds what HF's cache holds: per layer the normed latent (as "keys",
``[B, 1, S, kv_lora_rank]``) and the rotated shared rope key (as "values", ``[B, 1, S,
qk_rope_head_dim]``). A prompt with no cached prefix runs the expanded form (each latent
through ``kv_b_proj`` into per-head keys and values, through the module, so adapters and
quantized layers on it apply); steps over a cached prefix (decoding) run the absorbed form
(``_absorbed``), reading the cached latents as they are. The paged serving cache holds the
latent too (``paged.cache_layout``), always absorbed: ``kv_lora_rank + qk_rope_head_dim``
numbers per token and layer. An adapter on ``kv_b_proj`` keeps the expanded form (refused in
serving).
"""

from __future__ import annotations

import torch
from torch import nn

from mlx_core.config import ModelConfig
from mlx_core.models.attention import AttentionMetadata, FixedShapeDecode, attend
from mlx_core.models.linear import Linear
from mlx_core.models.paged import PagedAttentionMetadata
from mlx_kernels import rope

# HF's DeepSeek norms inside the attention keep their own default eps, not rms_norm_eps
_LATENT_NORM_EPS = 1e-6


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        from mlx_core.models.transformer import RMSNorm  # the module that builds this one

        self.layer = layer
        self.num_heads, self.rank = config.num_heads, config.kv_lora_rank
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        h, heads, bias = config.hidden_size, config.num_heads, config.attention_bias
        q_out = heads * config.qk_head_dim
        self.q_lora_rank = config.q_lora_rank
        if self.q_lora_rank is None:
            self.q_proj = Linear(h, q_out, bias=False)
        else:
            self.q_a_proj = Linear(h, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, _LATENT_NORM_EPS)
            self.q_b_proj = Linear(self.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = Linear(h, self.rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.rank, _LATENT_NORM_EPS)
        self.kv_b_proj = Linear(self.rank, heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(heads * self.v_dim, h, bias=config.attention_out_bias)
        self.interleaved = config.rope_interleave
        # attention runs at SDPA's default scale (qk_head_dim ** -0.5): the rest goes into queries
        self.query_scale = config.attention_scale * config.qk_head_dim**0.5

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x, cos_sin, meta) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.queries(x).view(b, t, self.num_heads, -1).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)[:, None]  # [B, 1, T, rank]: one "head"
        q_rope, k_rope = self._rotated(q_rope, cos_sin), self._rotated(k_rope[:, None], cos_sin)
        if isinstance(meta, PagedAttentionMetadata):
            weights = self._absorbed_weights()
            if weights is None:
                raise ValueError(
                    "the paged (serving) form of multi-head latent attention folds kv_b_proj's "
                    f"weight into the queries and outputs, and kv_b_proj here is a "
                    f"{type(self.kv_b_proj).__name__} (an adapter on it?): merge the adapter "
                    "into the model, or leave kv_b_proj out of its target modules")
            return self._absorbed(q_nope, q_rope, torch.cat([latent, k_rope], dim=-1), weights,
                                  meta)
        latent, k_rope, meta = _cached(latent, k_rope, meta, self.layer)
        s = latent.shape[2]
        # a cached prefix (decode steps, continued prompts): the absorbed form, whose weights
        # (de-quantized, for a quantized kv_b_proj) a fresh prompt does not need
        if t < s and (weights := self._absorbed_weights()) is not None:
            return self._absorbed(q_nope, q_rope, torch.cat([latent, k_rope], dim=-1), weights,
                                  meta)
        kv = self.kv_b_proj(latent[:, 0]).view(b, s, self.num_heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(b, self.num_heads, s, self.rope_dim)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        if self.query_scale != 1.0:
            q = q * self.query_scale
        out = attend(q, k, v, meta, self.layer)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.v_dim))

    def _absorbed(self, q_nope, q_rope, entries, weights, meta) -> torch.Tensor:
        """Attention in the latent space (DeepSeek-V2's paper; vLLM's MLA backends): each head's
        query taken into it through its slice of ``kv_b_proj`` (``q_nope @ W_UK``), multi-query
        attention over ``entries [B, 1, S, rank + rope]`` (the normed latents and rotated rope
        keys, keys and values at once), the attended latent out through the head's value slice
        (``@ W_UV.T``): the expanded form's scores and outputs, with no per-head key or value
        built. Per step it reads ``rank + rope`` numbers per cached token where the expanded form
        computes ``heads x (qk_head_dim + v_head_dim)``."""
        b, heads, t, _ = q_nope.shape
        w_uk, w_uv = weights
        q = torch.cat([torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk), q_rope], dim=-1)
        # attention scales by 1/sqrt(the entry's width): rescale to the model's own scale
        width = q.shape[-1]
        q = q * (self.query_scale * (width / (self.nope_dim + self.rope_dim)) ** 0.5)
        out = attend(q, entries, entries, meta, self.layer)[..., :self.rank]
        out = torch.einsum("bhtr,hvr->bhtv", out, w_uv)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, heads * self.v_dim))

    def _absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``kv_b_proj``'s weight per head: ``W_UK [heads, nope, rank]``, ``W_UV [heads, v,
        rank]`` (de-quantized if it is quantized); None when it is another module (an adapter's
        wrapper), whose output only the module itself computes."""
        layer = self.kv_b_proj
        if isinstance(layer, nn.Linear):
            weight = layer.weight
        elif hasattr(layer, "dequantized_weight") and hasattr(layer, "qweight"):
            weight = layer.dequantized_weight().to(self.kv_a_layernorm.weight.dtype)
        else:
            return None
        w = weight.view(self.num_heads, self.nope_dim + self.v_dim, self.rank)
        return w[:, :self.nope_dim], w[:, self.nope_dim:]

    def _rotated(self, x: torch.Tensor, cos_sin) -> torch.Tensor:
        if self.interleaved:  # pairs (x0, x1), (x2, x3), ... -> evens then odds
            x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
        return rope(x, *cos_sin)


def _cached(latent, k_rope, meta, layer: int):
    """Write this step's latents into the contiguous cache (if any); return all cached so far
    and the metadata for attention over the expanded keys (no cache left to write)."""
    if isinstance(meta, FixedShapeDecode):
        latent, k_rope = meta.cache.write_at(layer, latent, k_rope, meta.slot)
        return latent, k_rope, AttentionMetadata(meta.mask)
    if meta.cache is not None:
        latent, k_rope = meta.cache.update(layer, latent, k_rope)
        meta = AttentionMetadata(meta.mask)
    return latent, k_rope, meta
