"""Packed variable-length attention (prefill), plain and reading a cached prefix from paged
blocks; the reference is checked against SDPA run on each sequence alone."""

import importlib

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


# --- Gemma 2's soft-cap (scores -> cap * tanh(scores / cap) before mask and softmax) --------

CAP = 5.0  # queries scaled up so that scores of 5-15 are common: the cap changes the output a lot


def _assert_capped(got, args, atol, rtol, **kwargs):
    """``got`` equals the capped reference and is far from the uncapped one (a kernel that
    ignored the cap fails)."""
    assert_close(got, varlen_attention_reference(*args, softcap=CAP, **kwargs), atol, rtol)
    uncapped = varlen_attention_reference(*args, **kwargs)
    assert (got.float() - uncapped.float()).abs().max() > max(0.1, 10 * atol)


@pytest.mark.triton
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype_tol", DTYPES)
def test_triton_packed_with_softcap_matches_reference(window, causal, dtype_tol, triton_backend):
    dtype, atol, rtol = dtype_tol
    torch.manual_seed(0)
    lengths = [5, 33, 1, 17]
    cu, total = _cu(lengths), sum(lengths)
    q = (torch.randn(total, HQ, D) * 4).to(dtype)
    k, v = torch.randn(total, HKV, D, dtype=dtype), torch.randn(total, HKV, D, dtype=dtype)
    got = varlen_attention(q, k, v, cu, cu, causal=causal, sliding_window=window, softcap=CAP)
    _assert_capped(got, (q, k, v, cu, cu), atol, rtol, causal=causal, sliding_window=window)


@pytest.mark.triton
@pytest.mark.parametrize("window", [None, 5])
def test_triton_paged_prefix_with_softcap_matches_reference(window, triton_backend):
    torch.manual_seed(0)
    block, num_blocks = 4, 40
    kc, vc = torch.randn(num_blocks, block, HKV, D), torch.randn(num_blocks, block, HKV, D)
    keys_len, queries_len = [9, 20, 3], [4, 20, 1]
    tables = torch.randperm(num_blocks)[:18].view(3, 6).int()
    q = torch.randn(sum(queries_len), HQ, D) * 4
    args = (q, kc, vc, _cu(queries_len), _cu(keys_len))
    got = varlen_attention(*args, block_tables=tables, sliding_window=window, softcap=CAP)
    _assert_capped(got, args, 1e-5, 1e-5, block_tables=tables, sliding_window=window)


# --- the native CPU kernel (C, built at first use) for a few queries per sequence after a cached
# prefix: chunked prefill, prefix-cache continuation, speculative verification ------------------

BLOCK = 8
# (cached prefix, new queries) per sequence: prefixes ending mid-block and at a block boundary,
# none at all, 1..8 queries (counts that are not multiples of 4 too) and a sequence with none
CHUNKS = [(16, 1), (13, 3), (0, 5), (24, 8), (37, 4), (7, 6), (31, 2), (40, 7), (5, 0)]


@pytest.fixture
def native(monkeypatch):
    """The built native kernels (a C compiler is required: fails loudly if not), and a list that
    records each call of the native path, so a test knows the reference did not answer."""
    from mlx_kernels import _cpu_native, paged_attention

    assert _cpu_native.library() is not None, "no native CPU kernels: is a C compiler installed?"
    calls = []
    real = paged_attention.native_paged_attention
    monkeypatch.setattr(paged_attention, "native_paged_attention",
                        lambda *a: calls.append(a[5] is not None) or real(*a))
    return calls


def _paged_chunks(chunks, heads, kv_heads, dim, block=BLOCK, seed=0):
    """q, caches and the paged-call arguments for sequences of (cached prefix, queries): each
    sequence's keys/values are already in its shuffled blocks; unused table entries are -1."""
    torch.manual_seed(seed)
    keys_len = [p + n for p, n in chunks]
    blocks = [-(-n // block) for n in keys_len]
    num_blocks = sum(blocks) + 3
    kc = torch.randn(num_blocks, block, kv_heads, dim)
    vc = torch.randn(num_blocks, block, kv_heads, dim)
    tables = torch.full((len(chunks), max(blocks) + 1), -1, dtype=torch.int32)
    free = torch.randperm(num_blocks).tolist()
    for i, n in enumerate(blocks):
        tables[i, :n] = torch.tensor([free.pop() for _ in range(n)], dtype=torch.int32)
    q = torch.randn(sum(n for _, n in chunks), heads, dim)
    return q, kc, vc, _cu([n for _, n in chunks]), _cu(keys_len), tables


@pytest.mark.parametrize("window", [None, 1, 5, 100])
@pytest.mark.parametrize("shape", [(9, 3, 64), (HQ, HQ, D), (HQ, HKV, 20)],
                         ids=["gqa-smollm2", "mha", "general-loop"])  # head_dim 20: no tiles
def test_native_paged_chunks_equal_reference(native, window, shape):
    q, kc, vc, cu_q, cu_k, tables = _paged_chunks(CHUNKS, *shape)
    got = varlen_attention(q, kc, vc, cu_q, cu_k, block_tables=tables, sliding_window=window)
    want = varlen_attention_reference(q, kc, vc, cu_q, cu_k, block_tables=tables,
                                      sliding_window=window, scale=shape[2] ** -0.5)
    assert native == [True]  # the native kernel answered, with per-sequence query counts
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # fp32, another summation order


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(9, 3, 64), (HQ, HQ, D)], ids=["gqa-smollm2", "mha"])
def test_native_paged_chunks_read_a_half_precision_cache(native, cache_dtype, shape):
    """An fp32 q over an fp16/bf16 cache: the native loop converts each row as it reads it, so
    it equals the reference on the same numbers in fp32."""
    q, kc, vc, cu_q, cu_k, tables = _paged_chunks(CHUNKS, *shape)
    kc, vc = kc.to(cache_dtype), vc.to(cache_dtype)
    got = varlen_attention(q, kc, vc, cu_q, cu_k, block_tables=tables, sliding_window=5)
    assert native == [True] and got.dtype == torch.float32
    want = varlen_attention_reference(q, kc.float(), vc.float(), cu_q, cu_k, block_tables=tables,
                                      sliding_window=5, scale=shape[2] ** -0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # fp32, another summation order
    torch.testing.assert_close(  # the reference itself reads the half cache in fp32
        varlen_attention_reference(q, kc, vc, cu_q, cu_k, block_tables=tables, sliding_window=5),
        want, atol=1e-5, rtol=1e-5)


def test_native_paged_chunks_honour_scale_and_strided_q(native):
    q, kc, vc, cu_q, cu_k, tables = _paged_chunks(CHUNKS, 9, 3, 64, block=16, seed=1)
    q = q.transpose(0, 1).contiguous().transpose(0, 1)  # [T, heads, D] view, as paged_attend passes
    got = varlen_attention(q, kc, vc, cu_q, cu_k, block_tables=tables, scale=0.3, sliding_window=9)
    want = varlen_attention_reference(q, kc, vc, cu_q, cu_k, block_tables=tables, scale=0.3,
                                      sliding_window=9)
    assert native == [True]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("shape", [(9, 3, 64), (HQ, HQ, D)], ids=["gqa-smollm2", "mha"])
def test_native_paged_chunks_with_softcap_equal_reference(native, window, shape):
    q, kc, vc, cu_q, cu_k, tables = _paged_chunks(CHUNKS, *shape)
    q = q * 4  # scores ~ N(0, 16) at any head_dim: the default scale undoes its sqrt
    got = varlen_attention(q, kc, vc, cu_q, cu_k, block_tables=tables, sliding_window=window,
                           softcap=CAP)
    assert native == [True]  # the native kernel answered, not the reference
    _assert_capped(got, (q, kc, vc, cu_q, cu_k), 1e-5, 1e-5, block_tables=tables,
                   sliding_window=window, scale=shape[2] ** -0.5)


def test_native_one_query_per_sequence_equals_decode(native):
    """The same kernel with one query per sequence is paged decode (cu_q given or NULL)."""
    from mlx_kernels import paged_attention_decode

    chunks = [(p, 1) for p, _ in CHUNKS]
    q, kc, vc, cu_q, cu_k, tables = _paged_chunks(chunks, 9, 3, 64)
    got = varlen_attention(q, kc, vc, cu_q, cu_k, block_tables=tables, sliding_window=6)
    decode = paged_attention_decode(q, kc, vc, tables, cu_k[1:] - cu_k[:-1], sliding_window=6)
    assert native == [True, False]  # per-sequence counts, then decode's NULL
    torch.testing.assert_close(got, decode, atol=1e-6, rtol=1e-5)


# long prefills, whole or after a cached prefix: tasks of up to 8 queries (QUERY_CHUNK in the C
# source) split each sequence, the last one partial; keys up to 341, under NATIVE_MAX_KEYS
LONG_CHUNKS = [(0, 37), (0, 200), (64, 100), (5, 0), (300, 17), (3, 9)]


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [None, 1, 7, 100])
def test_native_tiles_take_long_prefills_and_equal_reference(native, window, cache_dtype):
    q, kc, vc, cu_q, cu_k, tables = _paged_chunks(LONG_CHUNKS, 9, 3, 64)
    kc, vc = kc.to(cache_dtype), vc.to(cache_dtype)
    got = varlen_attention(q, kc, vc, cu_q, cu_k, block_tables=tables, sliding_window=window)
    want = varlen_attention_reference(q, kc, vc, cu_q, cu_k, block_tables=tables,
                                      sliding_window=window, scale=64 ** -0.5)
    assert native == [True]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # fp32 sums, another order


def test_native_paged_path_only_where_it_applies(native, monkeypatch):
    # by import path: the package's attribute `varlen_attention` is the function, not the module
    module = importlib.import_module("mlx_kernels.varlen_attention")
    q, kc, vc, cu_q, cu_k, tables = _paged_chunks(CHUNKS, HQ, HKV, D)
    varlen_attention(q, kc, vc, cu_q, cu_k, block_tables=tables, causal=False)
    varlen_attention(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), cu_q, cu_k, block_tables=tables)
    assert native == []  # not causal, or not an fp32 query: the reference
    one = _cu([CHUNKS[0][1]]), _cu([sum(CHUNKS[0])])
    varlen_attention(q[:1], kc, vc, *one, block_tables=tables)
    assert native == [True]  # the tiles split a lone sequence's queries between the threads
    # without the tiles (head_dim not a multiple of 8), a lone sequence stays with SDPA, which
    # spreads it over the threads where the general loop takes a sequence per thread
    odd = _paged_chunks(CHUNKS, HQ, HKV, 20)
    varlen_attention(odd[0][:1], *odd[1:3], *one, block_tables=odd[5])
    assert native == [True]
    varlen_attention(*odd[:5], block_tables=odd[5])
    assert native == [True, True]
    native.clear()
    # the tiles: sequences of at most NATIVE_MAX_QUERIES queries or NATIVE_MAX_KEYS keys
    monkeypatch.setattr(module, "NATIVE_MAX_QUERIES", 7)  # CHUNKS has a chunk of 8 queries
    monkeypatch.setattr(module, "NATIVE_MAX_KEYS", 46)  # ... and one of 47 keys
    varlen_attention(q, kc, vc, cu_q, cu_k, block_tables=tables)
    assert native == []
    monkeypatch.setattr(module, "NATIVE_MAX_KEYS", 47)
    varlen_attention(q, kc, vc, cu_q, cu_k, block_tables=tables)
    assert native == [True]
    monkeypatch.setattr(module, "NATIVE_MAX_KEYS", 46)
    monkeypatch.setattr(module, "NATIVE_MAX_QUERIES", 8)
    varlen_attention(q, kc, vc, cu_q, cu_k, block_tables=tables)
    assert native == [True, True]
    monkeypatch.setenv("MLX_KERNELS", "torch")
    varlen_attention(q, kc, vc, cu_q, cu_k, block_tables=tables)
    assert native == [True, True]


def test_native_paged_refuses_tables_and_lengths_outside_the_cache(native):
    q, kc, vc, cu_q, cu_k, tables = _paged_chunks(CHUNKS, HQ, HKV, D)
    bad = tables.clone()
    bad[1, 1] = kc.shape[0]  # in use by sequence 1 (16 keys: blocks 0 and 1)
    with pytest.raises(ValueError, match=f"outside \\[0, {kc.shape[0]}\\)"):
        varlen_attention(q, kc, vc, cu_q, cu_k, block_tables=bad)
    bad[1, 1] = -1
    with pytest.raises(ValueError, match="outside"):
        varlen_attention(q, kc, vc, cu_q, cu_k, block_tables=bad)
    fewer = _cu([p + n - (i == 2) for i, (p, n) in enumerate(CHUNKS)])  # 4 keys, 5 queries
    with pytest.raises(ValueError, match="queries <= keys <= max_blocks"):
        varlen_attention(q, kc, vc, cu_q, fewer, block_tables=tables)
    with pytest.raises(ValueError, match="queries <= keys <= max_blocks"):
        varlen_attention(q, kc, vc, cu_q, cu_k * 3, block_tables=tables)  # more keys than blocks


@pytest.mark.parametrize("window", [None, 5])
def test_native_paged_splits_few_sequences_by_kv_head_and_still_equals_reference(native, window):
    """Fewer sequences than threads run one task per (sequence, kv head): decode of 1-3
    sequences and chunks of 2 sequences under 4 threads equal the reference."""
    from mlx_kernels import paged_attention_decode
    from mlx_kernels.paged_attention import paged_attention_decode_reference

    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        for chunks in ([(37, 1)], [(16, 1), (40, 1), (5, 1)], [(13, 3), (24, 8)]):
            q, kc, vc, cu_q, cu_k, tables = _paged_chunks(chunks, 9, 3, 64)
            if all(n == 1 for _, n in chunks):
                lens = cu_k[1:] - cu_k[:-1]
                got = paged_attention_decode(q, kc, vc, tables, lens, sliding_window=window)
                want = paged_attention_decode_reference(q, kc, vc, tables, lens,
                                                        sliding_window=window)
            else:
                got = varlen_attention(q, kc, vc, cu_q, cu_k, block_tables=tables,
                                       sliding_window=window)
                want = varlen_attention_reference(q, kc, vc, cu_q, cu_k, block_tables=tables,
                                                  sliding_window=window, scale=64 ** -0.5)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)
    assert native == [False, False, True]  # decode twice (NULL cu_q), then the chunks
