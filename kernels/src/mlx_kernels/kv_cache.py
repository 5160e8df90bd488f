"""Scatter new keys/values into a paged KV cache (vLLM's layout).

Cache layout: ``[num_blocks, block_size, kv_heads, head_dim]``; a token's slot is
``block * block_size + offset``; slot ``-1`` means "do not write" (padding).
"""

from __future__ import annotations

import torch

from mlx_kernels import _cpu_native
from mlx_kernels.dispatch import backend_for, native_cpu


def _check(key, value, key_cache, value_cache, slot_mapping):
    if key.shape != value.shape or key.dim() != 3:
        raise ValueError(f"key and value must both be [N, kv_heads, head_dim]; got "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    if key_cache.shape != value_cache.shape or key_cache.shape[2:] != key.shape[1:]:
        raise ValueError(f"caches must be [num_blocks, block_size, {key.shape[1]}, {key.shape[2]}]; "
                         f"got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}")
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("key_cache and value_cache must be contiguous tensors")
    if slot_mapping.shape != key.shape[:1]:
        raise ValueError(f"slot_mapping must be [N={key.shape[0]}], got {tuple(slot_mapping.shape)}")


def write_kv_cache_reference(key, value, key_cache, value_cache, slot_mapping) -> None:
    slots = slot_mapping.long()
    if bool((slots < 0).any()):  # padding rows: drop them (serving never has any)
        keep = slots >= 0
        slots, key, value = slots[keep], key[keep], value[keep]
    # index_copy_ is the cheapest scatter of whole rows on CPU
    key_cache.view(-1, *key_cache.shape[2:]).index_copy_(0, slots, key.to(key_cache.dtype))
    value_cache.view(-1, *value_cache.shape[2:]).index_copy_(0, slots, value.to(value_cache.dtype))


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                   value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write ``key, value [N, kv_heads, head_dim]`` into ``key_cache, value_cache
    [num_blocks, block_size, kv_heads, head_dim]`` at ``slot_mapping [N]`` (int; -1 skips).
    In place; no gradient."""
    _check(key, value, key_cache, value_cache, slot_mapping)
    if backend_for(key.device) == "triton":
        from mlx_kernels import _kv_cache_triton

        _kv_cache_triton.write(key, value, key_cache, value_cache, slot_mapping)
    elif (key.stride(-1) == value.stride(-1) == 1 and key.numel()
          and native_cpu(key, value, key_cache, value_cache)):
        _write_native(key, value, key_cache, value_cache, slot_mapping)
    else:
        write_kv_cache_reference(key, value, key_cache, value_cache, slot_mapping)


def _write_native(key, value, key_cache, value_cache, slot_mapping) -> None:
    """fp32 rows into an fp32 cache by the C loop ``write_kv_cache_f32``: one call for keys
    and values, read where they lie (rows of a fused projection's output, a stride apart)."""
    slots = slot_mapping.to(torch.int64).contiguous()
    total = key_cache.shape[0] * key_cache.shape[1]
    status = _cpu_native.library().write_kv_cache_f32(
        key.data_ptr(), value.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
        slots.data_ptr(), key.shape[0], key.shape[1], key.shape[2], total, *key.stride()[:2],
        *value.stride()[:2])
    if status != 0:
        raise IndexError(f"write_kv_cache: slot_mapping holds a slot outside [-1, {total}) "
                         f"(num_blocks * block_size): {slots.tolist()}")
