"""Attention of one new query token per sequence over keys/values held in paged blocks.

Cache layout ``[num_blocks, block_size, kv_heads, head_dim]`` (as ``write_kv_cache`` fills it);
``block_tables [B, max_blocks]`` lists each sequence's physical blocks in order;
``context_lens [B]`` is each sequence's number of cached tokens (the new one included, >= 1).
"""

from __future__ import annotations

import functools
import math

import torch

from mlx_kernels import _cpu_native
from mlx_kernels.dispatch import backend_for, native_cpu
from mlx_kernels.softcap_attention import softcap_attention


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of one sequence: ``[length, kv_heads, head_dim]``."""
    blocks = block_table[: -(-length // cache.shape[1])].long()
    return cache.index_select(0, blocks).reshape(-1, *cache.shape[2:])[:length]


def paged_attention_decode_reference(query, key_cache, value_cache, block_tables, context_lens, *,
                                     scale=None, sliding_window=None, softcap=None):
    b, heads, dim = query.shape
    max_len = block_tables.shape[1] * key_cache.shape[1]
    # index_select copies whole blocks about twice as fast as advanced indexing on CPU, and
    # this gather is most of a decode step's attention time there
    tables = block_tables.clamp(min=0).long().flatten()  # unused entries may hold -1
    # a half-precision cache under an fp32 query: attend in fp32, as the native kernel does
    dtype = torch.promote_types(query.dtype, key_cache.dtype)
    keys = key_cache.index_select(0, tables).view(b, max_len, *key_cache.shape[2:]).transpose(1, 2)
    values = value_cache.index_select(0, tables).view(b, max_len, *value_cache.shape[2:]).transpose(1, 2)
    keys, values = keys.to(dtype), values.to(dtype)
    pos = torch.arange(max_len, device=query.device)[None, :]
    lens = context_lens.to(query.device).long()[:, None]
    mask = pos < lens
    if sliding_window is not None:
        mask &= pos >= lens - sliding_window
    out = softcap_attention(
        query[:, :, None].to(keys.dtype), keys, values, attn_mask=mask[:, None, None, :],
        scale=scale, softcap=softcap, enable_gqa=heads != keys.shape[1])
    return out[:, :, 0].to(query.dtype)


def _check(query, key_cache, value_cache, block_tables, context_lens):
    if query.dim() != 3 or key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError("paged_attention_decode expects query [B, heads, head_dim] and caches "
                         f"[num_blocks, block_size, kv_heads, head_dim]; got {tuple(query.shape)}, "
                         f"{tuple(key_cache.shape)}, {tuple(value_cache.shape)}")
    if query.shape[1] % key_cache.shape[2] or query.shape[2] != key_cache.shape[3]:
        raise ValueError(f"query heads {query.shape[1]} must be a multiple of kv_heads "
                         f"{key_cache.shape[2]} and head_dim must match ({query.shape[2]} vs "
                         f"{key_cache.shape[3]})")
    block_size = key_cache.shape[1]
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if block_tables.shape[0] != query.shape[0] or context_lens.shape != query.shape[:1]:
        raise ValueError(f"block_tables [B, max_blocks] and context_lens [B] must have B="
                         f"{query.shape[0]}; got {tuple(block_tables.shape)}, {tuple(context_lens.shape)}")


def paged_attention_decode(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, *,
                           scale: float | None = None,
                           sliding_window: int | None = None,
                           softcap: float | None = None) -> torch.Tensor:
    """``query [B, heads, head_dim]`` attends to its sequence's ``context_lens[b]`` cached tokens.

    GQA when ``heads`` is a multiple of the caches' ``kv_heads``; ``sliding_window`` keeps only
    the last that many keys. ``scale`` defaults to ``1/sqrt(head_dim)``; ``softcap`` (Gemma 2,
    > 0) makes the scaled scores ``softcap * tanh(score / softcap)`` before the mask and softmax.
    fp32/bf16/fp16; returns ``[B, heads, head_dim]`` in the query's dtype. Inference only (no
    gradient).
    """
    _check(query, key_cache, value_cache, block_tables, context_lens)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 (or None), got {softcap}")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if backend_for(query.device) == "triton":
        from mlx_kernels import _paged_attention_triton

        return _paged_attention_triton.decode(query, key_cache, value_cache, block_tables,
                                              context_lens, scale, sliding_window, softcap)
    if native_cpu_over_cache(query, key_cache, value_cache):
        return _decode_native(query, key_cache, value_cache, block_tables, context_lens, scale,
                              sliding_window, softcap)
    return paged_attention_decode_reference(query, key_cache, value_cache, block_tables,
                                            context_lens, scale=scale, sliding_window=sliding_window,
                                            softcap=softcap)


# the element types of a paged cache that the native kernel reads (its kv_type codes): an fp32
# query over an fp16 or bf16 cache reads half the bytes and computes in fp32
KV_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def native_cpu_over_cache(query, key_cache, value_cache) -> bool:
    """Whether the native kernel runs: an fp32 CPU query (``native_cpu``) over CPU caches of one
    of ``KV_TYPES``."""
    return (native_cpu(query) and key_cache.dtype == value_cache.dtype
            and key_cache.dtype in KV_TYPES
            and key_cache.device.type == value_cache.device.type == "cpu")


def native_tiles(head_dim: int) -> bool:
    """Whether the native kernel computes in AVX2 register tiles at this ``head_dim`` (a
    multiple of 8, on a CPU with AVX2 and FMA); elsewhere it runs its general loop."""
    return head_dim % 8 == 0 and _tiles_built()


@functools.cache
def _tiles_built() -> bool:
    lib = _cpu_native.library()
    return lib is not None and bool(lib.paged_attention_tiles())


def _decode_native(query, key_cache, value_cache, block_tables, context_lens, scale,
                   sliding_window, softcap):
    """The C loop of ``_cpu_kernels.c``: each cached key and value read once, in place in its
    block (the reference first copies every sequence's blocks out, padded to the longest)."""
    lens = context_lens.to(torch.int32).contiguous()
    tables = block_tables.to(torch.int32).contiguous()
    if query.shape[0] and (int(lens.min()) < 1
                           or int(lens.max()) > tables.shape[1] * key_cache.shape[1]):
        raise ValueError(f"context_lens must be in [1, max_blocks * block_size = "
                         f"{tables.shape[1] * key_cache.shape[1]}]; got {lens.tolist()}")
    return native_paged_attention(query, key_cache, value_cache, tables, lens, None, scale,
                                  sliding_window, softcap)


def native_paged_attention(query, key_cache, value_cache, tables, lens, cu_q, scale,
                           sliding_window, softcap=None):
    """Run ``paged_attention_f32`` of ``_cpu_kernels.c`` (an fp32 CPU query over caches of
    ``KV_TYPES``; lengths already checked).

    ``tables [B, max_blocks]``, ``lens [B]`` and ``cu_q [B + 1]`` (or None: one query per
    sequence) int32 contiguous; ``query [total_q, heads, head_dim]``; ``softcap`` > 0 or None.
    Returns ``out`` like ``query``; a table entry in use outside the cache raises ValueError."""
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 (or None), got {sliding_window}")
    num_blocks, block_size, kv_heads, dim = key_cache.shape
    query, keys, values = query.contiguous(), key_cache.contiguous(), value_cache.contiguous()
    out = torch.empty_like(query)
    status = _cpu_native.library().paged_attention_f32(
        query.data_ptr(), keys.data_ptr(), values.data_ptr(), tables.data_ptr(), lens.data_ptr(),
        None if cu_q is None else cu_q.data_ptr(), out.data_ptr(), lens.shape[0], kv_heads,
        query.shape[1] // kv_heads, dim, block_size, tables.shape[1], num_blocks,
        sliding_window or 0, scale, softcap or 0.0,  # the C side reads a cap of 0 as none
        KV_TYPES[keys.dtype])
    if status == -2:
        raise ValueError(f"a block table entry in use is outside [0, {num_blocks}): "
                         "block_tables must name blocks of this cache")
    if status != 0:
        raise MemoryError("paged attention: out of memory for the score rows")
    return out
