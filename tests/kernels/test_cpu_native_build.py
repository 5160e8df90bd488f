"""The native CPU kernels' source builds for every x86 CPU the build may meet, not only this one:
``-march=native`` compiles the AVX-512 (and AVX-512 BF16) loops only where the CPU has them, and
a piece of AVX-512 code left outside its guard would fail the whole build elsewhere, leaving
every caller on its torch reference."""

import platform
import subprocess

import pytest

from mlx_kernels import _cpu_native


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
