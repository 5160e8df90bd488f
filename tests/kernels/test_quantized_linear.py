"""Quantized linear ops against their torch references (dequantize + ``F.linear``), odd shapes.

Tolerances: the references are exact (dequantized weights, fp32 GEMM). int8 up to
INT8_FAST_ROWS runs the native loop on fp32 activations: the reference to fp32 rounding. int4
with inputs in multiples of 64 runs its native loop on activations rounded to bf16, with fp32
sums: the reference on the rounded inputs to fp32 rounding. The other CPU fast paths (int4 on
other shapes; int8 where the native loop is not built) run torch's kernels on bf16 activations
(8 mantissa bits): each input rounds by up to 2^-9 relative and the output is returned from
bf16, so they agree with the reference to ~1e-2 of the output's scale, which is what the tests
allow. W8A8's native quantize/epilogue agree with its
reference to fp32 rounding (an FMA in the epilogue), 1e-6 relative.
"""

import pytest
import torch
import torch.nn.functional as F

from mlx_kernels import quantized_linear as ql

SHAPES = [(35, 96), (64, 64), (130, 192)]  # (out, in): odd outputs; inputs split into 32-groups


def _close_to_scale(got, want, fraction):
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= fraction * scale, (got - want).abs().max()


def test_the_constant_mark_is_the_one_torch_compiler_sets():
    """The native kernels' availability checks are marked constant for compiled graphs without
    importing torch._dynamo at import (2.5 s): the mark must stay the one torch's decorator sets."""
    def ours():
        return True

    def torchs():
        return True

    ql._constant_in_compiled_graphs(ours)
    torch.compiler.assume_constant_result(torchs)
    assert vars(ours) == vars(torchs) and vars(torchs)
    for marked in (ql._native_built, ql._int4_native_built, ql._w8a8_gemm_native):
        assert vars(marked).items() >= vars(torchs).items()


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_quantization_error(shape):
    """Without clipping every value is within half a step; the clipping search never does worse
    in squared error per row, and values inside the chosen range stay within half a step."""
    torch.manual_seed(0)
    w = torch.randn(shape)
    w[3] = 0  # a zero row gets scale 0 and zeros, not nan
    plain_q, plain_scale = ql.quantize_int8(w, clip_ratios=(1.0,))
    assert torch.all((ql.dequantize_int8(plain_q, plain_scale) - w).abs()
                     <= plain_scale[:, None] / 2 + 1e-6)
    q, scale = ql.quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.shape == (shape[0],)
    err = (ql.dequantize_int8(q, scale) - w).square().sum(1)
    plain_err = (ql.dequantize_int8(plain_q, plain_scale) - w).square().sum(1)
    assert torch.all(err <= plain_err + 1e-6)  # the plain range is one of the candidates
    inside = w.abs() <= 127 * scale[:, None]
    assert torch.all(((ql.dequantize_int8(q, scale) - w).abs() <= scale[:, None] / 2 + 1e-6)[inside])
    assert torch.all(ql.dequantize_int8(q, scale)[3] == 0)


def test_int8_clipping_pays_where_the_bulk_sits_on_a_finer_grid():
    """A row whose values lie on a grid 0.95 of its max wide (as weights born from coarser
    quantization do) but for one value at the max: clipping that one value to 0.95 costs less
    than the plain range's rounding of all the others."""
    torch.manual_seed(0)
    step = 0.95 / 127
    row = torch.randint(-127, 128, (1, 2048)).float() * step
    row[0, 0] = 1.0
    plain = ql.quantize_int8(row, clip_ratios=(1.0,))
    clipped = ql.quantize_int8(row)
    err = [(ql.dequantize_int8(*q) - row).square().sum().item() for q in (plain, clipped)]
    assert clipped[1].item() == pytest.approx(step) and err[1] < 0.5 * err[0]


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_quantization_error_is_at_most_half_a_step(group_size):
    torch.manual_seed(0)
    w = torch.randn(33, 128)
    w[5, :group_size] = 0.25  # a constant group: step 0, exact
    qweight, scales, mins = ql.quantize_int4(w, group_size)
    assert qweight.shape == (33, 64) and scales.shape == (33, 128 // group_size)
    q = ql.unpack_int4(qweight)
    assert q.max() <= 15
    deq = ql.dequantize_int4(qweight, scales, mins)
    step = scales.repeat_interleave(group_size, dim=1)
    assert torch.all((deq - w).abs() <= step / 2 + 1e-6)
    assert torch.all(deq[5, :group_size] == 0.25)
    # the packing: element 2j in byte j's low nibble, 2j+1 in its high one
    assert torch.equal(qweight[:, 0] & 15, q[:, 0]) and torch.equal(qweight[:, 0] >> 4, q[:, 1])


def test_bad_int4_group_sizes_name_the_choices():
    with pytest.raises(ValueError, match="choose one of 32, 64, 128"):
        ql.quantize_int4(torch.randn(8, 64), 48)
    with pytest.raises(ValueError, match="does not divide the 96 input features.*choose 32"):
        ql.quantize_int4(torch.randn(8, 96), 64)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 5, 64, 65])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_matches_its_reference(shape, rows, bias):
    """2 x rows: up to INT8_FAST_ROWS the native loop (fp32 activations), beyond the
    reference."""
    torch.manual_seed(rows)
    w, x = torch.randn(shape), torch.randn(2, rows, shape[1])
    b = torch.randn(shape[0]) if bias else None
    q, scale = ql.quantize_int8(w)
    want = F.linear(x, ql.dequantize_int8(q, scale), b)
    with torch.inference_mode():
        got = ql.int8_linear(x, q, scale, b, cpu_layout=ql.CpuLayout())
    assert got.shape == want.shape and got.dtype == torch.float32
    if 2 * rows > ql.INT8_FAST_ROWS:  # the reference itself
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        _close_to_scale(got, want, 1e-5)


def test_int8_rows_do_not_depend_on_their_batch():
    """The native loop computes each row alike: a row alone and the same row among 40 others
    (a decode step's batch) give bit-identical outputs, so greedy serving does not change with
    what a sequence is batched with."""
    torch.manual_seed(0)
    q, scale = ql.quantize_int8(torch.randn(96, 160))
    x = torch.randn(41, 160)
    with torch.inference_mode():
        alone = ql.int8_linear(x[:1], q, scale, cpu_layout=ql.CpuLayout())
        batched = ql.int8_linear(x, q, scale, cpu_layout=ql.CpuLayout())
    assert torch.equal(alone[0], batched[0])


def test_int8_takes_torchs_kernel_where_the_native_loop_is_not_built(monkeypatch):
    monkeypatch.setattr(ql, "_native_built", lambda: False)
    torch.manual_seed(0)
    w, x = torch.randn(64, 96), torch.randn(3, 96)
    q, scale = ql.quantize_int8(w)
    want = F.linear(x, ql.dequantize_int8(q, scale))
    with torch.inference_mode():
        got = ql.int8_linear(x, q, scale, cpu_layout=ql.CpuLayout())
    _close_to_scale(got, want, 1e-2)  # bf16 activations
    assert (got - want).abs().max() > 1e-6 * want.abs().max()  # not the fp32 loop


@pytest.mark.parametrize("shape", [*SHAPES, (33, 100)])  # 100 inputs: the loop without AVX-512
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_runs_the_native_loop_at_one_row(shape, bias):
    """A decode step's one row: the native loop on fp32 activations, the reference to fp32
    rounding (a sum of K products in another order)."""
    torch.manual_seed(shape[0])
    w, x = torch.randn(shape), torch.randn(1, 1, shape[1])
    b = torch.randn(shape[0]) if bias else None
    q, scale = ql.quantize_int8(w)
    want = F.linear(x, ql.dequantize_int8(q, scale), b)
    with torch.inference_mode():
        got = ql.int8_linear(x, q, scale, b, cpu_layout=ql.CpuLayout())
    assert got.shape == want.shape
    _close_to_scale(got, want, 1e-5)


@pytest.mark.parametrize("shape,group_size", [(s, 32) for s in SHAPES] + [((64, 64), 64),
                                              ((130, 192), 64), ((48, 256), 128)])
@pytest.mark.parametrize("rows", [1, 7, 32])
def test_int4_linear_matches_its_reference(shape, rows, group_size):
    """Outputs not in whole blocks of 16 (35, 130) take the reference: torch's CPU layout
    packs them in 16s."""
    torch.manual_seed(rows)
    w, x, b = torch.randn(shape), torch.randn(rows, shape[1]), torch.randn(shape[0])
    packed = ql.quantize_int4(w, group_size)
    want = F.linear(x, ql.dequantize_int4(*packed), b)
    with torch.inference_mode():
        got = ql.int4_linear(x, *packed, b, cpu_layout=ql.CpuLayout())
    _close_to_scale(got, want, 1e-2)


INT4_NATIVE_CASES = [((35, 64), 32), ((130, 192), 64), ((48, 256), 128), ((96, 576), 32),
                     ((17, 1536), 32)]


def _int4_native():
    """The native int4 loop must run where the CPU has AVX-512 BF16 or AVX2 + FMA + F16C;
    elsewhere these tests do not apply (torch's kernel runs there, tested above)."""
    from mlx_kernels import _cpu_native

    _native()
    flags = set(_cpu_native._cpu_signature().split())  # the flags the kernels build for
    if "avx512_bf16" not in flags and not {"avx2", "fma", "f16c"} <= flags:
        pytest.skip("this CPU has neither AVX-512 BF16 nor AVX2 + FMA + F16C, which the native "
                    "int4 loop needs; int4 runs torch's kernel here, which the tests above cover")
    if not ql._int4_native_built():
        pytest.fail("the CPU has AVX-512 BF16 or AVX2 but the native int4 loop was not built for it")


@pytest.mark.parametrize("shape,group_size", INT4_NATIVE_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_int4_linear_runs_the_native_loop_at_one_row(shape, group_size, bias):
    """A decode step's one row with inputs in multiples of 64: the native loop, on x rounded to
    bf16 (as torch's kernel takes it) with fp32 sums: the reference on those rounded inputs to
    fp32 rounding (1e-5 of the output's scale; the fp16 scales are used as they are, where
    torch's kernel rounds them to bf16)."""
    _int4_native()
    torch.manual_seed(shape[0])
    w, x = torch.randn(shape), torch.randn(1, 1, shape[1])
    b = torch.randn(shape[0]) if bias else None
    packed = ql.quantize_int4(w, group_size)
    want = F.linear(x.bfloat16().float(), ql.dequantize_int4(*packed), b)
    with torch.inference_mode():
        got = ql.int4_linear(x, *packed, b, cpu_layout=ql.CpuLayout())
    assert got.shape == want.shape
    _close_to_scale(got, want, 1e-5)
    _close_to_scale(got, F.linear(x, ql.dequantize_int4(*packed), b), 1e-2)


@pytest.mark.parametrize("shape,group_size", INT4_NATIVE_CASES)
@pytest.mark.parametrize("rows", [2, 5, 40])
def test_int4_native_loop_rows_do_not_depend_on_their_batch(shape, group_size, rows):
    """Several rows (AVX-512: the weight unpacked once, read by two rows at a time, an odd last
    one alone): each row as the reference, and bit for bit as that row alone, so greedy serving
    does not change with what a sequence is batched with."""
    _int4_native()
    torch.manual_seed(rows)
    packed = ql.quantize_int4(torch.randn(shape), group_size)
    x = torch.randn(rows, shape[1])
    with torch.inference_mode():
        got = ql.int4_linear(x, *packed, cpu_layout=ql.CpuLayout())
        alone = [ql.int4_linear(x[i:i + 1], *packed, cpu_layout=ql.CpuLayout()) for i in range(rows)]
    _close_to_scale(got, F.linear(x.bfloat16().float(), ql.dequantize_int4(*packed)), 1e-5)
    assert torch.equal(torch.cat(alone), got)


def test_int4_scales_the_loop_cannot_read_take_the_reference_compiled_too():
    """bf16 scales (a model cast to bf16 whole, then run in fp32) are not what the loop reads:
    the reference runs, eager and compiled, rather than the loop misreading them."""
    _int4_native()
    torch.manual_seed(0)
    q, scales, mins = ql.quantize_int4(torch.randn(32, 128), 32)
    scales, mins = scales.bfloat16(), mins.bfloat16()
    x = torch.randn(1, 128)
    want = F.linear(x, ql.dequantize_int4(q, scales, mins))
    with torch.inference_mode():
        eager = ql.int4_linear(x, q, scales, mins, cpu_layout=ql.CpuLayout())
        compiled = torch.compile(lambda x: ql.int4_linear(x, q, scales, mins), fullgraph=True)(x)
    _close_to_scale(eager, want, 1e-6)
    _close_to_scale(compiled, want, 1e-5)


def test_int4_native_loop_takes_fp32_scales():
    """GGUF's Q4_K brings fp32 scales and mins (products of its super-block scales), which the
    loop reads as they are."""
    _int4_native()
    torch.manual_seed(0)
    q, scales, mins = ql.quantize_int4(torch.randn(40, 320), 32)
    scales = scales.float() * (1 + torch.rand(scales.shape) * 1e-3)  # off the fp16 grid
    mins = mins.float()
    x = torch.randn(1, 320)
    want = F.linear(x.bfloat16().float(), ql.dequantize_int4(q, scales, mins))
    with torch.inference_mode():
        got = ql.int4_linear(x, q, scales, mins, cpu_layout=ql.CpuLayout())
    _close_to_scale(got, want, 1e-5)


def test_reference_paths_under_autograd_and_mlx_kernels_torch(monkeypatch):
    """Under autograd (QLoRA-style training) and with MLX_KERNELS=torch the ops are the exact
    references, and gradients reach the input."""
    torch.manual_seed(0)
    w = torch.randn(40, 64)
    q8, q4 = ql.quantize_int8(w), ql.quantize_int4(w, 32)
    for op, args, deq in ((ql.int8_linear, q8, ql.dequantize_int8(*q8)),
                          (ql.int4_linear, q4, ql.dequantize_int4(*q4))):
        x = torch.randn(3, 64, requires_grad=True)
        y = op(x, *args, cpu_layout=ql.CpuLayout())
        y.square().sum().backward()
        x2 = x.detach().clone().requires_grad_()
        F.linear(x2, deq).square().sum().backward()
        torch.testing.assert_close(x.grad, x2.grad)
        monkeypatch.setenv("MLX_KERNELS", "torch")
        with torch.inference_mode():
            assert torch.equal(op(x.detach(), *args, cpu_layout=ql.CpuLayout()), F.linear(x.detach(), deq))
        monkeypatch.delenv("MLX_KERNELS")


def test_cpu_layout_is_made_again_after_the_weight_changes():
    torch.manual_seed(0)
    layout = ql.CpuLayout()
    q, scale = ql.quantize_int8(torch.randn(16, 32))
    x = torch.randn(1, 32)
    with torch.inference_mode():
        first = ql.int8_linear(x, q, scale, cpu_layout=layout)
    q.mul_(-1)  # in place: the version counter moves
    with torch.inference_mode():
        second = ql.int8_linear(x, q, scale, cpu_layout=layout)
    _close_to_scale(second, -first, 1e-2)


def _native():
    from mlx_kernels import _cpu_native

    if _cpu_native.library() is None:
        pytest.fail("the native CPU kernels did not build here (a C compiler is needed)")


@pytest.mark.parametrize("rows,k", [(1, 64), (7, 130), (300, 576)])
def test_native_row_quantization_equals_the_reference_bit_for_bit(rows, k):
    _native()
    torch.manual_seed(k)
    x = torch.randn(rows, k) * torch.logspace(-3, 3, rows)[:, None]
    x[0] = 0  # a zero row: q 0, scale 0
    got, want = ql.quantize_rows(x), ql.quantize_rows_reference(x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.all(got[0][0] == 0) and got[1][0] == 0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 17, 200])
@pytest.mark.parametrize("bias", [False, True])
def test_w8a8_linear_matches_its_reference_and_fp32(shape, rows, bias, monkeypatch):
    from mlx_kernels import _cpu_native

    _native()
    # the oneDNN path is taken only with AMX (with VNNI alone oneDNN runs its reference loop);
    # its arithmetic is checked on any CPU with VNNI. Without VNNI (AVX2 alone) oneDNN's int8
    # GEMM multiplies in saturating 16-bit pairs and is off by whole units: not taken there.
    vnni = bool(set(_cpu_native._cpu_signature().split()) & {"avx512_vnni", "avx_vnni", "amx_int8"})
    if vnni:
        monkeypatch.setattr(ql, "_cpu_has_amx", lambda: True)
    torch.manual_seed(rows)
    w, x = torch.randn(shape), torch.randn(rows, shape[1])
    b = torch.randn(shape[0]) if bias else None
    q, scale = ql.quantize_int8(w)
    want = ql.w8a8_linear_reference(x, q, scale, b)
    with torch.inference_mode():
        got = ql.w8a8_linear(x, q, scale, b)  # torch._int_mm (no VNNI: the native GEMM)
        layout = ql.CpuLayout()
        packed = ql.w8a8_linear(x, q, scale, b, cpu_layout=layout)  # oneDNN's packed (AMX)
    assert rows == 1 or (layout.data is not None) == vnni
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(packed, want, atol=1e-5, rtol=1e-5)
    # int8 weights and activations: within a few percent of the fp32 product's scale
    _close_to_scale(want, F.linear(x, w, b), 3e-2)


# 3001: two blocks of input rows (W8A8_BLOCK_BYTES at k = 96: 2730 rows), an odd row last
@pytest.mark.parametrize("rows", [1, 2, 17, 3001])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("narrow", [False, True])
def test_w8a8_native_gemm_equals_int_mm_bit_for_bit(rows, bias, narrow, monkeypatch):
    """The native W8A8 GEMM (taken where the CPU has no VNNI, as torch._int_mm runs a reference
    loop there), on any CPU with AVX2, eager and compiled: torch._int_mm's int32 sums scaled as
    dequantize_s32_f32 scales them, bit for bit. ``narrow``: weights within +-64 (W7A8), which
    run the narrow GEMM (vpmaddubsw on inputs offset by 128) eagerly, at the ends of both
    ranges too: its int16 pair sums reach 2 * 255 * 64 there, not past int16."""
    from mlx_kernels import _cpu_native

    _native()
    if "avx2" not in _cpu_native._cpu_signature().split():
        pytest.skip("the native W8A8 GEMM needs AVX2, which this CPU lacks; torch._int_mm runs here")
    monkeypatch.setattr(ql, "_w8a8_gemm_native_here", lambda: True)
    torch.manual_seed(rows)
    n, k = 70, 96
    q, scale = ql.quantize_int8(torch.randn(n, k), qmax=ql.NARROW_QMAX if narrow else 127)
    x, b = torch.randn(rows, k), (torch.randn(n) if bias else None)
    x[0, :4] = torch.tensor([3.0, 3.0, -3.0, -3.0]) * x[0].abs().max()  # rows' ends: +-127
    q[0, :4] = torch.tensor([1, 1, -1, -1], dtype=torch.int8) * int(q.abs().max())
    xq, xscale = ql.quantize_rows(x)
    acc = torch._int_mm(xq, q.t()).contiguous()
    want = torch.empty(rows, n)
    _cpu_native.library().dequantize_s32_f32(acc.data_ptr(), xscale.data_ptr(), scale.data_ptr(),
                                             None if b is None else b.data_ptr(), want.data_ptr(),
                                             rows, n)
    layout = ql.CpuLayout()
    with torch.inference_mode():
        eager = ql.w8a8_linear(x, q, scale, b, cpu_layout=layout)
        compiled = torch.compile(lambda x: ql.w8a8_linear(x, q, scale, b), fullgraph=True)(x)
    assert (layout.data is not None) == narrow  # the narrow GEMM's offsets, made once
    assert torch.equal(eager, want)
    assert torch.equal(compiled, want)


def test_narrow_offsets_only_for_weights_within_the_narrow_range():
    """The narrow GEMM's int16 pair sums hold only for weights within +-64, in rows of whole
    steps of 32: any other weight runs the full-range GEMM."""
    q = torch.randint(-ql.NARROW_QMAX, ql.NARROW_QMAX + 1, (6, 64), dtype=torch.int8)
    offsets = ql.narrow_offsets(q)
    assert offsets.dtype == torch.int32 and torch.equal(offsets, q.sum(dim=1, dtype=torch.int32) * 128)
    for value in (ql.NARROW_QMAX + 1, -ql.NARROW_QMAX - 1, -128):
        wide = q.clone()
        wide[3, 5] = value
        assert ql.narrow_offsets(wide) is None
    assert ql.narrow_offsets(q[:, :48].contiguous()) is None  # 48 inputs: not whole steps of 32


@pytest.mark.parametrize("rows,k", [(1, 64), (7, 130), (300, 576)])
def test_native_row_quantization_offset_for_the_narrow_gemm(rows, k):
    """quantize_rows_u8: quantize_rows' values plus 128, as uint8, and the same scales."""
    from mlx_kernels import _cpu_native

    _native()
    torch.manual_seed(k)
    x = torch.randn(rows, k) * torch.logspace(-3, 3, rows)[:, None]
    xu, scale = torch.empty(rows, k, dtype=torch.uint8), torch.empty(rows)
    _cpu_native.library().quantize_rows_u8(x.data_ptr(), xu.data_ptr(), scale.data_ptr(), rows, k)
    q, want_scale = ql.quantize_rows_reference(x)
    assert torch.equal(xu.to(torch.int16) - 128, q.to(torch.int16))
    assert torch.equal(scale, want_scale)


@pytest.mark.parametrize("shape,group_size", [((35, 96), 32), ((64, 64), 64), ((130, 192), 32),
                                              ((48, 80), 16)])
@pytest.mark.parametrize("rows", [1, 5, 128, 129])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_with_group_scales_matches_its_reference(shape, group_size, rows, bias):
    """GGUF Q8_0's / Q5_0's form (a scale per 32 inputs; Q6_K's per 16): the native C loop up to INT8_FAST_ROWS rows
    (fp32 activations, so fp32 summation-order differences only), the reference beyond."""
    _native()
    torch.manual_seed(rows)
    n, k = shape
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = torch.rand(n, k // group_size) * 0.01
    w = ql.dequantize_int8(q, scale)
    assert torch.equal(w.view(n, -1, group_size), q.float().view(n, -1, group_size) * scale[..., None])
    x, b = torch.randn(rows, k), (torch.randn(n) if bias else None)
    with torch.inference_mode():
        got = ql.int8_linear(x, q, scale, b)
    torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-5, rtol=1e-5)


def test_weights_at_unaligned_addresses_run():
    """A tensor read out of a safetensors file can start at any byte; torch's int8 CPU kernel
    crashes on one that is not 64-byte aligned, so its layout is an aligned copy then."""
    torch.manual_seed(0)
    q, scale = ql.quantize_int8(torch.randn(128, 64))
    buffer = torch.empty(q.numel() + 24, dtype=torch.int8)
    unaligned = buffer[24:].view(128, 64)
    unaligned.copy_(q)
    assert unaligned.data_ptr() % 64 != 0 and ql.aligned(unaligned).data_ptr() % 64 == 0
    x = torch.randn(14, 64)
    with torch.inference_mode():
        got = ql.int8_linear(x, unaligned, scale, cpu_layout=ql.CpuLayout())
    _close_to_scale(got, F.linear(x, ql.dequantize_int8(q, scale)), 1e-2)


@pytest.mark.triton
@pytest.mark.parametrize("kind", ["int8", "int8-groups", "int8-groups16", "int4", "int4-fp32-scales"])
@pytest.mark.parametrize("shape,rows", [((35, 96), 5), ((64, 64), 1), ((130, 192), 33)])
@pytest.mark.parametrize("bias", [False, True])
def test_triton_dequant_matmul_matches_the_reference(kind, shape, rows, bias, triton_backend):
    """The weight de-quantized in registers inside the GEMM (fp32, IEEE dots): equal to the
    reference's dequantize + F.linear to fp32 summation order. Groups of 16 and fp32 scales
    and minimums are GGUF's Q6_K and Q4_K forms."""
    torch.manual_seed(rows)
    n, k = shape
    w, x = torch.randn(n, k), torch.randn(rows, k)
    b = torch.randn(n) if bias else None
    with torch.inference_mode():
        if kind.startswith("int4"):
            packed = ql.quantize_int4(w, 32)
            if kind == "int4-fp32-scales":
                packed = (packed[0], packed[1].float() * 1.001, packed[2].float())
            got = ql.int4_linear(x, *packed, b)
            want = F.linear(x, ql.dequantize_int4(*packed), b)
        else:
            q, scale = ql.quantize_int8(w)
            if kind.startswith("int8-groups"):
                group = 16 if kind == "int8-groups16" else 32
                scale = scale[:, None].repeat(1, k // group) * torch.rand(n, k // group)
            got = ql.int8_linear(x, q, scale, b)
            want = F.linear(x, ql.dequantize_int8(q, scale), b)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", ["int8", "int8-groups", "int4", "int4-native", "w8a8"])
def test_each_op_compiles_whole_and_equals_its_eager_call(kind):
    """Under torch.compile(fullgraph=True) (the compiled decode step): torch's int8 and int4
    kernels, the native int8 and int4 loops as opaque ops (inductor cannot trace them),
    W8A8 with torch._int_mm; the eager call's result to the bf16 activations' rounding (W8A8
    and the native loops: fp32 rounding, ~1e-6 relative)."""
    torch.manual_seed(0)
    n, k = 64, 128 if kind == "int4-native" else 96
    w, x, b = torch.randn(n, k) * 0.05, torch.randn(1, k), torch.randn(n)
    if kind.startswith("int4"):
        tensors, op = ql.quantize_int4(w, 32), ql.int4_linear
    elif kind == "int8-groups":
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        tensors, op = (q, torch.rand(n, k // 32) * 0.01), ql.int8_linear
    else:
        tensors, op = ql.quantize_int8(w), ql.w8a8_linear if kind == "w8a8" else ql.int8_linear
    layout = ql.CpuLayout()
    with torch.inference_mode():
        eager = op(x, *tensors, b, cpu_layout=layout)  # makes the CPU layout a compiled call reads
        compiled = torch.compile(lambda x: op(x, *tensors, b, cpu_layout=layout), fullgraph=True)(x)
    _close_to_scale(compiled, eager, 1e-5 if kind in ("w8a8", "int8-groups", "int4-native") else 1e-2)


def test_compiling_before_any_eager_call_names_the_fix():
    """torch's int4 kernel (96 inputs: not the native loop's multiple of 64) takes a layout made
    on the first eager call (the native loops need none)."""
    tensors = ql.quantize_int4(torch.randn(32, 96), 32)
    layout = ql.CpuLayout()
    step = torch.compile(lambda x: ql.int4_linear(x, *tensors, cpu_layout=layout), fullgraph=True)
    with torch.inference_mode(), pytest.raises(Exception, match="run the model once before compiling"):
        step(torch.randn(1, 96))


def test_cpu_kernels_names_what_the_dispatch_runs_here(monkeypatch):
    """The benchmarks' record of this CPU: its features among CPU_FEATURES, and each op's kernel
    as the dispatch's own predicates choose it (W8A8's three ways forced one by one)."""
    from mlx_kernels import _cpu_native

    info = ql.cpu_kernels()
    flags = set(_cpu_native._cpu_signature().split())
    assert info["features"] == [f for f in ql.CPU_FEATURES if f in flags] and info["cpu"]
    built = _cpu_native.library()
    if built is not None and "avx512_bf16" in flags and "avx512f" in flags:
        assert info["int4"] == "native loop: AVX-512 BF16 dot products"
    elif built is not None and {"avx2", "fma", "f16c"} <= flags:
        assert info["int4"] == "native loop: AVX2 fp32 FMAs"
    assert info["int8"].startswith("native loop" if built is not None else "torch")
    for native, amx, want in ((True, False, "native GEMM"), (False, True, "oneDNN"),
                              (False, False, "torch._int_mm")):
        monkeypatch.setattr(ql, "_w8a8_gemm_native", lambda native=native: native)
        monkeypatch.setattr(ql, "_cpu_has_amx", lambda amx=amx: amx)
        assert ql.cpu_kernels()["w8a8"].startswith(want)
    monkeypatch.setattr(_cpu_native, "library", lambda: None)  # no compiler: torch's kernels
    unbuilt = ql.cpu_kernels()
    assert unbuilt["int8"] == "torch _weight_int8pack_mm"
    assert unbuilt["int4"] == "torch _weight_int4pack_mm_for_cpu"
    assert unbuilt["w8a8"] == ql.REFERENCE_KERNEL  # native_cpu is False: W8A8's reference
    monkeypatch.setenv("MLX_KERNELS", "torch")  # every op on its reference, as _path sends it
    off = ql.cpu_kernels()
    assert off["int8"] == off["int4"] == off["w8a8"] == ql.REFERENCE_KERNEL
    with torch.inference_mode():  # and that is what runs: the reference's numbers exactly
        x, (q, scale) = torch.randn(3, 64), ql.quantize_int8(torch.randn(5, 64))
        assert torch.equal(ql.int8_linear(x, q, scale), F.linear(x, ql.dequantize_int8(q, scale)))
    line = ql.cpu_kernels_line(off)
    assert line.startswith(off["cpu"]) and f"int4 {ql.REFERENCE_KERNEL}" in line
