"""The attention seam: every use (training, generation, later serving) calls ``attend``.

``AttentionMetadata`` says how keys and values are stored for this forward pass: nowhere
(training: causal over the batch), or in a contiguous ``KVCache`` (generation). The paged layout
of the serving engine plugs in here as one more kind of metadata, and so does
``FixedShapeDecode``: one new token per row written at a slot given as a tensor and attending
over the whole cache under a mask, so that every step has the same shapes and no host sync
(``mlx_core.models.decode_step`` compiles it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlx_core.config import ModelConfig
from mlx_kernels import softcap_attention


class KVCache:
    """A static contiguous cache: per layer, keys/values ``[B, kv_heads, max_length, head_dim]``
    (one tensor each, not views of one: a compiled step writes a slot of each in place, where a
    write through a view of a shared tensor would be compiled as a copy of all of it).

    Rows share one write position (``length``); which cached slots hold real tokens (not left
    padding) is kept in ``key_valid [B, max_length]``.

    Multi-head latent attention (``mlx_core.models.mla``) caches its latent as the "keys"
    ``[B, 1, max_length, kv_lora_rank]`` and its shared RoPE key part as the "values"
    ``[B, 1, max_length, qk_rope_head_dim]``.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch_size, config.kv_heads, max_length, config.dim_per_head)
        value_shape = shape
        if config.is_mla:
            shape = (batch_size, 1, max_length, config.kv_lora_rank)
            value_shape = (batch_size, 1, max_length, config.qk_rope_head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.values = [torch.zeros(value_shape, dtype=dtype, device=device)
                       for _ in range(config.num_layers)]
        self.key_valid = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        self.max_length = max_length
        self.length = 0

    def append_mask(self, valid: torch.Tensor) -> None:
        """Record which of the next ``valid.shape[1]`` tokens are real (``valid [B, T]`` bool)."""
        end = self.length + valid.shape[1]
        if end > self.max_length:
            raise ValueError(
                f"KV cache full: {end} tokens do not fit in max_length={self.max_length}; "
                "create the cache with a larger max_length"
            )
        self.key_valid[:, self.length:end] = valid

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this step's ``k, v [B, kv_heads, T, D]``; return all keys/values so far."""
        end = self.length + k.shape[2]
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, self.length:end] = k
        values[:, :, self.length:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def write_at(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor):
        """Write one step's ``k, v [B, kv_heads, 1, D]`` at cache slot ``slot`` (a 1-element long
        tensor); return the layer's whole keys/values ``[B, kv_heads, max_length, D]``."""
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, slot] = k
        values[:, :, slot] = v
        return keys, values

    def advance(self, n: int) -> None:
        self.length += n


@dataclass
class AttentionMetadata:
    """``mask`` is bool ``[B, 1, T, S]`` (True: may attend) or None for plain causal attention."""

    mask: torch.Tensor | None
    cache: KVCache | None = None


@dataclass
class FixedShapeDecode:
    """One new query per row, written at ``slot`` (long ``[1]``) of ``cache``; ``mask`` is bool
    ``[B, 1, 1, max_length]`` over every slot of the cache (True: may attend)."""

    cache: KVCache
    slot: torch.Tensor
    mask: torch.Tensor


def build_mask(
    key_valid: torch.Tensor | None, q_len: int, past: int, window: int | None, device
) -> torch.Tensor | None:
    """Causal (+ sliding window) (+ key padding) mask for queries at ``past .. past+q_len``.

    Returns None when no mask is needed: plain causal attention over a fresh batch (SDPA's fused
    causal path), or one new query per row that may see every cached key (decoding).
    """
    if key_valid is None and window is None and (past == 0 or q_len == 1):
        return None
    q_pos = torch.arange(past, past + q_len, device=device)[:, None]
    k_pos = torch.arange(past + q_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (q_pos - k_pos < window)
    mask = allowed[None, None]
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    # A query that sees no key (a left-padding row) attends to itself, so no row is all -inf:
    # such rows would be NaN and NaN leaks through the zero attention weights of later layers.
    return mask | (k_pos == q_pos)[None, None]


def attend(q, k, v, meta, layer: int, softcap: float | None = None) -> torch.Tensor:
    """``q [B, Hq, T, D]``, ``k, v [B, Hkv, T, D]`` -> ``[B, Hq, T, D]``; ``meta`` is an
    ``AttentionMetadata`` or a ``paged.PagedAttentionMetadata``; ``softcap``: Gemma 2's cap on
    the scores."""
    if isinstance(meta, FixedShapeDecode):
        k, v = meta.cache.write_at(layer, k, v, meta.slot)
        return softcap_attention(q, k, v, attn_mask=meta.mask, softcap=softcap,
                                 enable_gqa=q.shape[1] != k.shape[1])
    if not isinstance(meta, AttentionMetadata):
        from mlx_core.models.paged import paged_attend

        return paged_attend(q, k, v, meta, layer, softcap)
    if meta.cache is not None:
        k, v = meta.cache.update(layer, k, v)
    return softcap_attention(
        q, k, v,
        attn_mask=meta.mask,
        is_causal=meta.mask is None and q.shape[2] > 1,
        softcap=softcap,
        enable_gqa=q.shape[1] != k.shape[1],
    )
