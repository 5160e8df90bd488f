"""The paged layout of the attention seam, for serving: keys/values live in fixed-size blocks of
one preallocated cache, and a forward pass runs several sequences packed into one row.

The caller (a serving engine's model runner) decides block tables and slots; the model only
writes each token's key/value to its slot and attends through ``mlx_kernels`` (varlen attention
for prefill, which also reads a cached prefix; paged decode for one token per sequence).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

from mlx_core.config import ModelConfig
from mlx_kernels import paged_attention_decode, varlen_attention, write_kv_cache
from mlx_kernels.paged_attention import native_cpu_over_cache
from mlx_kernels.varlen_attention import runs_native


class PagedKVCache:
    """``[layers, num_blocks, block_size, kv_heads, head_dim]`` for keys and for values."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int = 16, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        heads, dim, self.shared_values = cache_layout(config)
        shape = (config.num_layers, num_blocks, block_size, heads, dim)
        self.keys = _zeroed(shape, dtype, torch.device(device))
        self.values = self.keys if self.shared_values else _zeroed(shape, dtype,
                                                                   torch.device(device))
        self.block_size = block_size
        self.num_blocks = num_blocks

    def copy_tokens(self, source: int, destination: int, num_tokens: int) -> None:
        """Keys and values of the first ``num_tokens`` slots of block ``source``, every layer,
        into block ``destination`` (a prefix shared up to the middle of a block)."""
        for cache in (self.keys,) if self.shared_values else (self.keys, self.values):
            cache[:, destination, :num_tokens] = cache[:, source, :num_tokens]


def cache_layout(config: ModelConfig) -> tuple[int, int, bool]:
    """``(heads, width, values are the keys)`` of one token's entry per layer. Multi-head latent
    attention (mla.py) caches its latent and its rotated shared rope key as one "head" that
    serves as key and value (the absorbed form), ``kv_lora_rank + qk_rope_head_dim`` numbers
    per token, where the expanded keys and values would take ``num_heads x (qk_head_dim +
    v_head_dim)``."""
    if config.is_mla:
        return 1, config.kv_lora_rank + config.qk_rope_head_dim, True
    return config.kv_heads, config.dim_per_head, False


def _zeroed(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled cache. On CPU a large one comes straight from the OS (glibc mmaps any
    allocation over 32 MiB), whose pages are zero and committed only when first written: start-up
    costs nothing and resident memory grows with the blocks in use, not with the budget."""
    size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if device.type == "cpu" and size >= 64 * 2**20:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device)


@dataclass
class PagedAttentionMetadata:
    """One packed forward pass over ``S`` sequences (``T`` tokens in all, input row ``[1, T]``).

    Decodes come first, then prefills (vLLM's order), so one forward can mix both and each part
    runs its own kernel. ``slot_mapping [T]``: where each new token's key/value goes
    (block * block_size + offset). ``block_tables [S, max_blocks]``: each sequence's blocks, in
    the same order. Decode part: ``context_lens [D]`` (one new token for each of the first ``D``
    sequences, the new token counted in). Prefill part: ``cu_seqlens_q [P+1]`` (new tokens per
    sequence) and ``cu_seqlens_k [P+1]`` (cached prefix + new tokens) for the other ``P``.
    ``rope_lengths [1, T]``: with a length-dependent RoPE scaling (dynamic NTK, LongRoPE), the
    sequence length each token's table is for (its own sequence's, not the packed row's).
    """

    cache: PagedKVCache
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor | None = None
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    sliding_window: int | None = None
    rope_lengths: torch.Tensor | None = None

    def __post_init__(self):
        if self.context_lens is None and self.cu_seqlens_q is None:
            raise ValueError("PagedAttentionMetadata needs context_lens (decodes), "
                             "cu_seqlens_q/cu_seqlens_k (prefills) or both")
        if (self.cu_seqlens_q is None) != (self.cu_seqlens_k is None):
            raise ValueError("pass cu_seqlens_q and cu_seqlens_k together")

    @functools.cached_property
    def prefills_are_whole(self) -> bool:
        """Every prefill chunk is its sequence's start (no cached prefix to read back)."""
        return self.cu_seqlens_q is not None and torch.equal(self.cu_seqlens_q, self.cu_seqlens_k)

    @functools.cached_property
    def prefill_extent(self) -> tuple[int, int, int]:
        """``(sequences, most new tokens, most keys)`` of the prefill part."""
        lq = (self.cu_seqlens_q[1:] - self.cu_seqlens_q[:-1]).tolist()
        lk = (self.cu_seqlens_k[1:] - self.cu_seqlens_k[:-1]).tolist()
        return len(lq), max(lq, default=0), max(lk, default=0)

    @property
    def num_decodes(self) -> int:
        return 0 if self.context_lens is None else len(self.context_lens)

    @functools.cached_property
    def decode_groups(self) -> list[tuple[int, int, int]]:
        """The decodes as runs ``(start, end, columns)`` that each read only the block-table
        columns they use. The torch reference of decode attention (bf16 on CPU, or no C
        compiler) copies keys/values out of the blocks, padded to the longest context; a caller
        that orders decodes by context length (as mlx_serve's runner does) saves most of the
        padding. The native CPU kernel and the Triton kernel read no padding either way; the
        native one runs all decodes in one call (``paged_attend``)."""
        lens = self.context_lens.tolist()
        size, columns = self.cache.block_size, self.block_tables.shape[1]
        bounds = [round(i * len(lens) / _DECODE_GROUPS) for i in range(_DECODE_GROUPS + 1)]
        groups = []
        for start, end in itertools.pairwise(bounds):
            if start == end:
                continue
            width = min(columns, -(-max(lens[start:end]) // size))
            if groups and groups[-1][2] == width:
                groups[-1] = (groups[-1][0], end, width)
            else:
                groups.append((start, end, width))
        padded = sum((end - start) * width for start, end, width in groups)
        if padded > 0.8 * len(lens) * columns:  # unordered or even lengths: one call is cheaper
            return [(0, len(lens), columns)]
        return groups


_DECODE_GROUPS = 4


def paged_attend(q, k, v, meta: PagedAttentionMetadata, layer: int,
                 softcap: float | None = None) -> torch.Tensor:
    """``q [1, Hq, T, D]``, ``k, v [1, Hkv, T, D]`` (packed) -> ``[1, Hq, T, D]``."""
    q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))  # -> [T, heads, D]
    key_cache, value_cache = meta.cache.keys[layer], meta.cache.values[layer]
    write_kv_cache(k, v, key_cache, value_cache, meta.slot_mapping)
    d = meta.num_decodes
    parts = []
    # the native CPU kernel reads no padding, so it takes all decodes at once: four calls instead
    # cost ~2 s of mlx bench serve's ~17 s outside the GEMMs (2 threads, one call per layer/step)
    groups = ((meta.decode_groups if not native_cpu_over_cache(q, key_cache, value_cache)
               else [(0, d, meta.block_tables.shape[1])]) if d else ())
    for start, end, columns in groups:
        parts.append(paged_attention_decode(
            q[start:end], key_cache, value_cache, meta.block_tables[start:end, :columns],
            meta.context_lens[start:end], sliding_window=meta.sliding_window, softcap=softcap))
    if meta.cu_seqlens_q is not None and meta.prefills_are_whole and not runs_native(
            q, key_cache, value_cache, *meta.prefill_extent):
        # no cached prefix: SDPA over the packed new keys/values, no read-back from the cache (the
        # native kernel reads them where they now are, in the cache: below)
        parts.append(varlen_attention(q[d:], k[d:], v[d:], meta.cu_seqlens_q, meta.cu_seqlens_q,
                                      sliding_window=meta.sliding_window, softcap=softcap))
    elif meta.cu_seqlens_q is not None:
        parts.append(varlen_attention(q[d:], key_cache, value_cache, meta.cu_seqlens_q,
                                      meta.cu_seqlens_k, sliding_window=meta.sliding_window,
                                      block_tables=meta.block_tables[d:], softcap=softcap))
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.transpose(0, 1)[None]
