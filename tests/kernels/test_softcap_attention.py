"""Soft-capped attention (Gemma 2): without a cap it is SDPA; with one, the scores are
``cap * tanh(scores / cap)`` before mask and softmax (checked against the formula written out in
float64), and paged decode and varlen prefill with a cap equal it on the same keys."""

import math

import torch
import torch.nn.functional as F

from mlx_kernels import paged_attention_decode, softcap_attention, varlen_attention


def _reference(q, k, v, mask, cap):
    groups = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(groups, -3).double(), v.repeat_interleave(groups, -3).double()
    scores = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = torch.tanh(scores / cap) * cap
    return (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v).float()


def test_softcap_attention_is_sdpa_without_a_cap_and_the_formula_with_one():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 7, 16, generator=g) * 3 for h in (4, 2, 2))
    mask = torch.ones(7, 7, dtype=torch.bool).tril()
    plain = softcap_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(plain, F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                enable_gqa=True), atol=1e-6)
    capped = softcap_attention(q, k, v, is_causal=True, softcap=2.0, enable_gqa=True)
    assert (capped - _reference(q, k, v, mask, 2.0)).abs().max() < 1e-5
    assert (capped - plain).abs().max() > 1e-2  # the cap matters at these score sizes


def test_paged_decode_and_varlen_prefill_take_the_cap():
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, dim, block = 4, 2, 16, 4
    keys, values = (torch.randn(9, kv_heads, dim, generator=g) * 3 for _ in range(2))
    query = torch.randn(9, heads, dim, generator=g) * 3
    cache_k, cache_v = (torch.zeros(4, block, kv_heads, dim) for _ in range(2))
    table = torch.tensor([[2, 0, 3]])
    for i in range(9):
        cache_k[table[0, i // block], i % block] = keys[i]
        cache_v[table[0, i // block], i % block] = values[i]
    full = _reference(query.transpose(0, 1)[None], keys.transpose(0, 1)[None],
                      values.transpose(0, 1)[None], torch.ones(9, 9, dtype=torch.bool).tril(),
                      2.5)[0].transpose(0, 1)
    decoded = paged_attention_decode(query[-1:], cache_k, cache_v, table, torch.tensor([9]),
                                     softcap=2.5)
    assert (decoded - full[-1:]).abs().max() < 1e-5
    cu = torch.tensor([0, 9])
    packed = varlen_attention(query, keys, values, cu, cu, softcap=2.5)
    assert (packed - full).abs().max() < 1e-5
    paged = varlen_attention(query[5:], cache_k, cache_v, torch.tensor([0, 4]), cu,
                             block_tables=table, softcap=2.5)
    assert (paged - full[5:]).abs().max() < 1e-5
