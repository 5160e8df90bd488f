"""Packed variable-length attention (prefill), plain and reading a cached prefix from paged
blocks; the reference is checked against SDPA run on each sequence alone."""

import pytest
import torch
import torch.nn.functional as F

from mlx_kernels import varlen_attention
from mlx_kernels.varlen_attention import varlen_attention_reference

from .conftest import DTYPES, assert_close

HQ, HKV, D = 4, 2, 24


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def test_reference_equals_sdpa_per_sequence():
    torch.manual_seed(0)
    lengths = [5, 17, 1]
    cu = _cu(lengths)
    q, k, v = torch.randn(23, HQ, D), torch.randn(23, HKV, D), torch.randn(23, HKV, D)
    got = varlen_attention_reference(q, k, v, cu, cu)
    for i in range(3):
        s, e = cu[i], cu[i + 1]
        want = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), k[s:e].transpose(0, 1).repeat_interleave(2, 0),
            v[s:e].transpose(0, 1).repeat_interleave(2, 0), is_causal=True).transpose(0, 1)
        torch.testing.assert_close(got[s:e], want, atol=1e-6, rtol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype_tol", DTYPES)
def test_triton_packed_matches_reference(window, causal, dtype_tol, triton_backend):
    dtype, atol, rtol = dtype_tol
    torch.manual_seed(0)
    lengths = [5, 33, 1, 17]
    cu, total = _cu(lengths), sum(lengths)
    q = torch.randn(total, HQ, D, dtype=dtype)
    k, v = torch.randn(total, HKV, D, dtype=dtype), torch.randn(total, HKV, D, dtype=dtype)
    got = varlen_attention(q, k, v, cu, cu, causal=causal, sliding_window=window)
    want = varlen_attention_reference(q, k, v, cu, cu, causal=causal, sliding_window=window)
    assert_close(got, want, atol, rtol)


@pytest.mark.triton
@pytest.mark.parametrize("window", [None, 5])
def test_triton_reads_cached_prefix_from_paged_blocks(window, triton_backend):
    torch.manual_seed(0)
    block, num_blocks = 4, 40
    kc, vc = torch.randn(num_blocks, block, HKV, D), torch.randn(num_blocks, block, HKV, D)
    keys_len, queries_len = [9, 20, 3], [4, 20, 1]  # prefix cached: 5, 0 and 2 tokens
    tables = torch.randperm(num_blocks)[:18].view(3, 6).int()
    q = torch.randn(sum(queries_len), HQ, D)
    args = (q, kc, vc, _cu(queries_len), _cu(keys_len))
    got = varlen_attention(*args, block_tables=tables, sliding_window=window)
    want = varlen_attention_reference(*args, block_tables=tables, sliding_window=window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the last query of each sequence equals one decode step over the same cache
    from mlx_kernels import paged_attention_decode

    last = _cu(queries_len)[1:] - 1
    decode = paged_attention_decode(q[last], kc, vc, tables, torch.tensor(keys_len),
                                    sliding_window=window)
    torch.testing.assert_close(got[last], decode, atol=1e-5, rtol=1e-5)
