"""Triton KV-cache write: one program per token copies its kv_heads * head_dim values."""

import triton
import triton.language as tl

from mlx_kernels._grid import next_power_of_2


@triton.jit
def _write_kv(K, V, K_CACHE, V_CACHE, SLOTS, stride_k, stride_v, ROW: tl.constexpr,
              BLOCK: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(SLOTS + token).to(tl.int64)
    if slot >= 0:
        cols = tl.arange(0, BLOCK)
        mask = cols < ROW
        k = tl.load(K + token * stride_k + cols, mask=mask)
        v = tl.load(V + token * stride_v + cols, mask=mask)
        tl.store(K_CACHE + slot * ROW + cols, k.to(K_CACHE.dtype.element_ty), mask=mask)
        tl.store(V_CACHE + slot * ROW + cols, v.to(V_CACHE.dtype.element_ty), mask=mask)


def write(key, value, key_cache, value_cache, slot_mapping) -> None:
    n, heads, dim = key.shape
    key = key.reshape(n, heads * dim)
    value = value.reshape(n, heads * dim)
    if key.stride(1) != 1:
        key = key.contiguous()
    if value.stride(1) != 1:
        value = value.contiguous()
    row = heads * dim
    _write_kv[(n,)](key, value, key_cache, value_cache, slot_mapping.contiguous(),
                    key.stride(0), value.stride(0), ROW=row, BLOCK=next_power_of_2(row))
