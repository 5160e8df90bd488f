"""The native CPU kernels' source builds for every x86 CPU the build may meet, not only this one:
``-march=native`` compiles the AVX-512 (and AVX-512 BF16) loops only where the CPU has them, and
a piece of AVX-512 code left outside its guard would fail the whole build elsewhere, leaving
every caller on its torch reference."""

import ctypes
import platform
import subprocess

import pytest
import torch
import torch.nn.functional as F

from mlx_kernels import _cpu_native
from mlx_kernels import quantized_linear as ql


@pytest.mark.parametrize("arch", ["x86-64-v2", "x86-64-v3", "skylake-avx512", "sapphirerapids"])
def test_kernels_build_for_other_x86_cpus(arch, tmp_path):
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"x86 -march targets do not apply to this {platform.machine()} machine")
    compiler = _cpu_native.compiler()
    if compiler is None:
        pytest.fail("no C compiler (cc, or $CC) found: the native kernels need one")
    flags = [f"-march={arch}" if f == "-march=native" else f for f in _cpu_native.FLAGS]
    done = subprocess.run([compiler, *flags, str(_cpu_native.SOURCE), "-o",
                           str(tmp_path / "kernels.so"), "-lm"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def _loaded_build(arch, tmp_path):
    """The kernels built for ``arch`` and loaded, where this CPU runs that target."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"x86 -march targets do not apply to this {platform.machine()} machine")
    needed = {"x86-64-v2": {"sse4_2", "popcnt"}, "x86-64-v3": {"avx2", "fma", "f16c", "bmi2"}}[arch]
    if not needed <= set(_cpu_native._cpu_signature().split()):
        pytest.skip(f"this CPU cannot run an {arch} build (it lacks {sorted(needed)})")
    test_kernels_build_for_other_x86_cpus(arch, tmp_path)
    return _cpu_native.declare(ctypes.CDLL(str(tmp_path / "kernels.so")))


@pytest.mark.parametrize("arch", ["x86-64-v2", "x86-64-v3"])
@pytest.mark.parametrize("rows", [1, 3, 13])  # 13: past the AVX2 loops' weight-panel thresholds
def test_the_loops_of_cpus_without_avx512_equal_their_references(arch, rows, tmp_path):
    """What a CPU without AVX-512 runs, on any CPU that can: the x86-64-v3 build's AVX2 int8 and
    int4 loops and W8A8 GEMM, the x86-64-v2 build's generic int8 loop (it has no int4 loop nor
    W8A8 GEMMs: -1, torch's kernels then). To fp32 rounding (1e-5 of the output's scale) against
    the references, int4 on inputs rounded to bf16 as its AVX-512 loop takes them; each row bit
    for bit as alone; the W8A8 GEMM bit for bit as torch._int_mm's int32 sums, scaled."""
    lib = _loaded_build(arch, tmp_path)
    torch.manual_seed(rows)
    n, k = 37, 192
    w, x, bias = torch.randn(n, k), torch.randn(rows, k), torch.randn(n)

    def int8(q, scale, x):
        y = torch.empty(x.shape[0], n)
        lib.int8_group_linear_f32(x.data_ptr(), q.data_ptr(), scale.data_ptr(), bias.data_ptr(),
                                  y.data_ptr(), x.shape[0], n, k, k // scale.shape[1])
        return y

    def int4(q, scales, mins, x):
        y = torch.full((x.shape[0], n), float("nan"))
        done = lib.int4_group_linear_f32(x.data_ptr(), q.data_ptr(), scales.data_ptr(),
                                         mins.data_ptr(), scales.dtype is torch.float32,
                                         bias.data_ptr(), y.data_ptr(), x.shape[0], n, k,
                                         k // scales.shape[1])
        return y if done == 0 else None

    def close(got, want):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()

    q8, channel_scale = ql.quantize_int8(w)
    xq, xscale = ql.quantize_rows_reference(x)  # W8A8: the native GEMM (AVX2), or -1
    acc = torch._int_mm(xq, q8.t()).contiguous()
    want = torch.empty(rows, n)
    lib.dequantize_s32_f32(acc.data_ptr(), xscale.data_ptr(), channel_scale.data_ptr(),
                           bias.data_ptr(), want.data_ptr(), rows, n)
    got = torch.empty(rows, n)
    done = lib.w8a8_gemm_f32(xq.data_ptr(), xscale.data_ptr(), q8.data_ptr(),
                             channel_scale.data_ptr(), bias.data_ptr(), got.data_ptr(), rows, n, k)
    assert done == (-1 if arch == "x86-64-v2" else 0)
    assert arch == "x86-64-v2" or torch.equal(got, want)
    q7, narrow_scale = ql.quantize_int8(w, qmax=ql.NARROW_QMAX)  # W7A8: the narrow GEMM, or -1
    acc = torch._int_mm(xq, q7.t()).contiguous()
    lib.dequantize_s32_f32(acc.data_ptr(), xscale.data_ptr(), narrow_scale.data_ptr(),
                           bias.data_ptr(), want.data_ptr(), rows, n)
    xu = (xq.to(torch.int16) + 128).to(torch.uint8)
    offsets = ql.narrow_offsets(q7)
    done = lib.w8a8_gemm_narrow_f32(xu.data_ptr(), xscale.data_ptr(), q7.data_ptr(),
                                    offsets.data_ptr(), narrow_scale.data_ptr(), bias.data_ptr(),
                                    got.data_ptr(), rows, n, k)
    assert done == (-1 if arch == "x86-64-v2" else 0)
    assert arch == "x86-64-v2" or torch.equal(got, want)
    for scale in (channel_scale.view(-1, 1).contiguous(), torch.rand(n, k // 32) / 100):  # Q8_0
        got = int8(q8, scale, x)
        close(got, F.linear(x, ql.dequantize_int8(q8, scale), bias))
        assert torch.equal(torch.cat([int8(q8, scale, x[i:i + 1]) for i in range(rows)]), got)
    assert lib.int4_native_available() == (0 if arch == "x86-64-v2" else 1)  # its AVX2 loop
    for group in (32, 64):
        q4, scales, mins = ql.quantize_int4(w, group)
        for wide in (False, True):  # fp16 scales, or fp32 ones (Q4_K) off the fp16 grid
            s, m = (scales.float() * 1.0001, mins.float()) if wide else (scales, mins)
            got = int4(q4, s, m, x)
            if arch == "x86-64-v2":
                assert got is None
                continue
            close(got, F.linear(x.bfloat16().float(), ql.dequantize_int4(q4, s, m), bias))
            assert torch.equal(torch.cat([int4(q4, s, m, x[i:i + 1]) for i in range(rows)]), got)
