"""KV-cache write and paged-attention decode; references checked against plain softmax attention
on the gathered cache."""

import pytest
import torch

from mlx_kernels import paged_attention_decode, write_kv_cache
from mlx_kernels.kv_cache import write_kv_cache_reference
from mlx_kernels.paged_attention import gather_paged, paged_attention_decode_reference

from .conftest import DTYPES, assert_close

HQ, HKV, D, BLOCK, NUM_BLOCKS = 6, 2, 24, 4, 24
LENGTHS = [5, 11, 1, 16]


def _filled_cache(dtype):
    """A cache holding LENGTHS tokens per sequence in shuffled blocks, and its block tables."""
    torch.manual_seed(0)
    kc = torch.zeros(NUM_BLOCKS, BLOCK, HKV, D, dtype=dtype)
    vc = torch.zeros_like(kc)
    tables = torch.full((len(LENGTHS), 5), -1, dtype=torch.int32)
    free = torch.randperm(NUM_BLOCKS).tolist()
    keys, values, slots = [], [], []
    for i, n in enumerate(LENGTHS):
        blocks = [free.pop() for _ in range(-(-n // BLOCK))]
        tables[i, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        slots += [blocks[t // BLOCK] * BLOCK + t % BLOCK for t in range(n)]
        keys.append(torch.randn(n, HKV, D, dtype=dtype))
        values.append(torch.randn(n, HKV, D, dtype=dtype))
    return kc, vc, tables, torch.cat(keys), torch.cat(values), torch.tensor(slots)


def _assert_write_equals_reference(k, v, kc, vc, slots):
    """write_kv_cache as it dispatches equals the reference scatter (slot 3 is padding)."""
    slots[3] = -1  # padding: not written
    ref_k, ref_v = kc.clone(), vc.clone()
    write_kv_cache_reference(k, v, ref_k, ref_v, slots)
    write_kv_cache(k, v, kc, vc, slots)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
    assert kc.view(-1, HKV, D)[slots[2]].equal(k[2])


@pytest.mark.triton
def test_triton_kv_write_matches_reference(triton_backend):
    kc, vc, _, k, v, slots = _filled_cache(torch.float32)
    _assert_write_equals_reference(k, v, kc, vc, slots)


def test_native_kv_write_equals_reference_and_checks_slots_first(native):
    """The C loop writes fp32 rows where they lie (here: key and value views of a fused
    projection's output, rows a stride apart, and values with heads apart too), skips slot -1,
    and refuses a slot outside the cache before it writes anything."""
    kc, vc, _, k, v, slots = _filled_cache(torch.float32)
    k = torch.cat([k.flatten(1), torch.randn(len(k), 5)], dim=1)[:, :HKV * D].view(-1, HKV, D)
    v = torch.cat([v, torch.randn(len(v), HKV, 3)], dim=2)[..., :D]  # rows and heads apart
    _assert_write_equals_reference(k, v, kc, vc, slots)
    before_k, before_v = kc.clone(), vc.clone()
    bad = slots.flip(0).clone()
    bad[-1] = kc.shape[0] * kc.shape[1]  # the last row's slot is one past the cache
    with pytest.raises(IndexError, match="outside"):
        write_kv_cache(k * 2, v * 2, kc, vc, bad)
    assert torch.equal(kc, before_k) and torch.equal(vc, before_v)  # nothing written


def _plain_attention(q, keys, values):
    rep = q.shape[0] // keys.shape[1]
    keys, values = keys.repeat_interleave(rep, 1).float(), values.repeat_interleave(rep, 1).float()
    weights = torch.softmax(torch.einsum("hd,lhd->hl", q.float(), keys) / D**0.5, dim=-1)
    return torch.einsum("hl,lhd->hd", weights, values)


@pytest.mark.parametrize("window", [None, 3])
def test_reference_equals_plain_attention_on_gathered_cache(window):
    kc, vc, tables, k, v, slots = _filled_cache(torch.float32)
    write_kv_cache_reference(k, v, kc, vc, slots)
    q = torch.randn(len(LENGTHS), HQ, D)
    lens = torch.tensor(LENGTHS)
    got = paged_attention_decode_reference(q, kc, vc, tables, lens, sliding_window=window)
    for i, n in enumerate(LENGTHS):
        start = 0 if window is None else max(n - window, 0)
        keys, values = gather_paged(kc, tables[i], n)[start:], gather_paged(vc, tables[i], n)[start:]
        torch.testing.assert_close(got[i], _plain_attention(q[i], keys, values), atol=1e-5, rtol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("dtype_tol", DTYPES)
def test_triton_decode_matches_reference(window, dtype_tol, triton_backend):
    dtype, atol, rtol = dtype_tol
    kc, vc, tables, k, v, slots = _filled_cache(dtype)
    write_kv_cache_reference(k, v, kc, vc, slots)
    q = torch.randn(len(LENGTHS), HQ, D, dtype=dtype)
    lens = torch.tensor(LENGTHS, dtype=torch.int32)
    got = paged_attention_decode(q, kc, vc, tables, lens, sliding_window=window)
    want = paged_attention_decode_reference(q, kc, vc, tables, lens, scale=D**-0.5,
                                            sliding_window=window)
    assert_close(got, want, atol, rtol)


# --- Gemma 2's soft-cap: every path against the reference (which test_softcap_attention checks
# against the formula in float64) ------------------------------------------------------------

CAP = 5.0  # queries scaled up so that scores of 5-15 are common: the cap changes the output a lot


def _capped_case(dtype, heads=HQ):
    kc, vc, tables, k, v, slots = _filled_cache(dtype)
    write_kv_cache_reference(k, v, kc, vc, slots)
    q = (torch.randn(len(LENGTHS), heads, D) * 4).to(dtype)
    return q, kc, vc, tables, torch.tensor(LENGTHS, dtype=torch.int32)


def _assert_capped(got, args, window, atol, rtol, scale=None):
    """``got`` equals the capped reference and is far from the uncapped one (a kernel that
    ignored the cap fails)."""
    want = paged_attention_decode_reference(*args, scale=scale, sliding_window=window, softcap=CAP)
    assert_close(got, want, atol, rtol)
    uncapped = paged_attention_decode_reference(*args, scale=scale, sliding_window=window)
    assert (got.float() - uncapped.float()).abs().max() > max(0.1, 10 * atol)


@pytest.mark.triton
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("dtype_tol", DTYPES)
def test_triton_decode_with_softcap_matches_reference(window, dtype_tol, triton_backend):
    dtype, atol, rtol = dtype_tol
    args = _capped_case(dtype)  # GQA 6/2, head_dim 24, lengths 5, 11, 1, 16 over 4-token blocks
    got = paged_attention_decode(*args, sliding_window=window, softcap=CAP)
    _assert_capped(got, args, window, atol, rtol)


def test_softcap_must_be_positive():
    with pytest.raises(ValueError, match="softcap must be > 0"):
        paged_attention_decode(*_capped_case(torch.float32), softcap=0.0)


def test_bad_layouts_are_named():
    kc = torch.zeros(4, 3, HKV, D)
    with pytest.raises(ValueError, match="power of two"):
        paged_attention_decode(torch.zeros(1, HQ, D), kc, kc, torch.zeros(1, 2, dtype=torch.int32),
                               torch.ones(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_cache(torch.zeros(2, HKV, D), torch.zeros(2, HKV, D), kc, kc, torch.zeros(3))


# --- the native CPU kernel (C, built at first use; the CPU default for fp32) -------------------

@pytest.fixture
def native():
    """The built native kernels (CI machines have a C compiler: the fixture fails loudly if not)."""
    from mlx_kernels import _cpu_native

    lib = _cpu_native.library()
    assert lib is not None, "no native CPU kernels: is a C compiler (cc) installed?"
    return lib


@pytest.mark.parametrize("window", [None, 1, 3, 100])
@pytest.mark.parametrize("heads", [HQ, HKV], ids=["gqa", "mha"])
def test_native_decode_equals_reference(native, window, heads):
    kc, vc, tables, k, v, slots = _filled_cache(torch.float32)
    write_kv_cache_reference(k, v, kc, vc, slots)
    q = torch.randn(heads, len(LENGTHS), D).transpose(0, 1)  # [B, heads, D], not contiguous
    lens = torch.tensor(LENGTHS, dtype=torch.int32)
    got = paged_attention_decode(q, kc, vc, tables, lens, sliding_window=window)
    want = paged_attention_decode_reference(q, kc, vc, tables, lens, scale=D**-0.5,
                                            sliding_window=window)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)  # fp32, another summation order


@pytest.mark.parametrize("kv_heads,group,dim", [
    (1, 1, 8), (2, 2, 40), (3, 3, 64), (1, 4, 72), (2, 5, 16), (1, 7, 32), (2, 8, 24),
    (2, 3, 12)])  # head_dim 12: not a multiple of 8, the general loop
@pytest.mark.parametrize("batch", [1, 5], ids=["split-by-kv-head", "by-sequence"])
def test_native_decode_tiles_equal_reference_for_every_group_and_head_dim(
        native, kv_heads, group, dim, batch):
    """The register tiles take up to 3 heads by 4 keys and 32 dimensions by runs of 32 tokens:
    groups and head dims that leave partial tiles, lengths that end inside a tile and a run."""
    torch.manual_seed(kv_heads * 100 + group * 10 + dim)
    block, blocks = 8, 64
    lens = torch.tensor([70, 1, 33, 4, 37][:batch], dtype=torch.int32)
    kc, vc = torch.randn(2, blocks, block, kv_heads, dim).unbind(0)
    tables = torch.randperm(blocks)[:batch * 9].view(batch, 9).to(torch.int32)
    q = torch.randn(batch, kv_heads * group, dim)
    for window, softcap in [(None, None), (5, None), (None, 2.0)]:
        got = paged_attention_decode(q, kc, vc, tables, lens, sliding_window=window,
                                     softcap=softcap)
        want = paged_attention_decode_reference(q, kc, vc, tables, lens, scale=dim**-0.5,
                                                sliding_window=window, softcap=softcap)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)  # fp32, another order


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kv_heads,group,dim", [(3, 3, 64), (2, 3, 12), (1, 4, 72), (1, 2, 12)])
def test_native_decode_reads_a_half_precision_cache(native, monkeypatch, cache_dtype, kv_heads,
                                                    group, dim):
    """An fp32 query over an fp16/bf16 cache (EngineConfig.kv_cache_dtype): the C kernel converts
    each row as it reads it (exactly), so it equals the fp32 reference on the same numbers; the
    torch reference attends in fp32 too. Rows of 12 numbers end in 4 converted one at a time,
    here fp16 subnormals."""
    from mlx_kernels import paged_attention

    calls = []
    real = paged_attention._decode_native
    monkeypatch.setattr(paged_attention, "_decode_native", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(dim)
    lens = torch.tensor([70, 1, 33, 4, 37], dtype=torch.int32)
    kc, vc = torch.randn(2, 64, 8, kv_heads, dim).unbind(0)
    vc[..., 8:] *= 1e-5  # below fp16's normal range (6.1e-5)
    kc, vc = kc.to(cache_dtype), vc.to(cache_dtype)
    tables = torch.randperm(64)[:45].view(5, 9).to(torch.int32)
    q = torch.randn(5, kv_heads * group, dim)
    for window in (None, 5):
        got = paged_attention_decode(q, kc, vc, tables, lens, sliding_window=window)
        want = paged_attention_decode_reference(q, kc.float(), vc.float(), tables, lens,
                                                sliding_window=window)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(paged_attention_decode_reference(
            q, kc, vc, tables, lens, sliding_window=window), want, atol=2e-6, rtol=1e-5)
    assert calls == [1, 1]


@pytest.mark.parametrize("window", [None, 2, 7])
@pytest.mark.parametrize("heads", [HQ, HKV], ids=["gqa", "mha"])
def test_native_decode_with_softcap_equals_reference(native, monkeypatch, window, heads):
    from mlx_kernels import paged_attention

    calls = []
    real = paged_attention._decode_native
    monkeypatch.setattr(paged_attention, "_decode_native", lambda *a: calls.append(1) or real(*a))
    q, *rest = _capped_case(torch.float32, heads)
    args = (q.transpose(0, 1).contiguous().transpose(0, 1), *rest)  # strided, as paged_attend passes
    got = paged_attention_decode(*args, sliding_window=window, softcap=CAP, scale=0.3)
    assert calls == [1]  # the C kernel answered, not the reference
    _assert_capped(got, args, window, 1e-5, 1e-5, scale=0.3)  # fp32; its tanh within 2e-7 * cap


def test_native_decode_runs_by_default_on_cpu_and_not_under_torch_setting(native, monkeypatch):
    from mlx_kernels import paged_attention

    calls = []
    real = paged_attention._decode_native
    monkeypatch.setattr(paged_attention, "_decode_native",
                        lambda *a: calls.append(1) or real(*a))
    kc, vc, tables, k, v, slots = _filled_cache(torch.float32)
    args = (torch.randn(len(LENGTHS), HQ, D), kc, vc, tables, torch.tensor(LENGTHS))
    paged_attention_decode(*args)
    assert calls == [1]
    paged_attention_decode(args[0].bfloat16(), kc.bfloat16(), vc.bfloat16(), *args[3:])
    assert calls == [1]  # bf16 stays on the reference
    monkeypatch.setenv("MLX_KERNELS", "torch")
    paged_attention_decode(*args)
    assert calls == [1]


def test_native_decode_refuses_tables_and_lengths_outside_the_cache(native):
    kc, vc, tables, *_ = _filled_cache(torch.float32)
    q, lens = torch.randn(len(LENGTHS), HQ, D), torch.tensor(LENGTHS)
    bad = tables.clone()
    bad[1, 2] = NUM_BLOCKS  # in use by sequence 1 (11 tokens: blocks 0..2)
    with pytest.raises(ValueError, match="outside \\[0, 24\\)"):
        paged_attention_decode(q, kc, vc, bad, lens)
    bad[1, 2] = -1
    with pytest.raises(ValueError, match="outside"):
        paged_attention_decode(q, kc, vc, bad, lens)
    with pytest.raises(ValueError, match="context_lens must be in \\[1, max_blocks"):
        paged_attention_decode(q, kc, vc, tables, torch.tensor([5, 11, 1, 21]))


def test_native_build_is_cached_atomic_and_falls_back_without_a_compiler(monkeypatch, tmp_path,
                                                                         caplog):
    from mlx_kernels import _cpu_native

    monkeypatch.setenv("MLX_HOME", str(tmp_path))
    built = _cpu_native._build("cc")
    assert built.parent == tmp_path / "kernels" and built.exists()
    stamp = built.stat().st_mtime_ns
    assert _cpu_native._build("cc") == built and built.stat().st_mtime_ns == stamp  # reused
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no partial files left

    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    _cpu_native.library.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="mlx_kernels"):
            assert _cpu_native.library() is None
        assert "no C compiler" in caplog.text and "install gcc" in caplog.text
        kc, vc, tables, k, v, slots = _filled_cache(torch.float32)
        write_kv_cache_reference(k, v, kc, vc, slots)
        q, lens = torch.randn(len(LENGTHS), HQ, D), torch.tensor(LENGTHS)
        torch.testing.assert_close(  # the reference answers instead
            paged_attention_decode(q, kc, vc, tables, lens),
            paged_attention_decode_reference(q, kc, vc, tables, lens))
    finally:
        _cpu_native.library.cache_clear()
