"""Native CPU kernels (``_cpu_kernels.c``), built with the system C compiler at first use.

Triton has no CPU backend outside its interpreter, so the ops whose torch reference is bound by
copies on CPU get a small C loop instead: built once per machine and source (``cc -O3
-march=native -fopenmp``, see ``FLAGS``; well under a second, no torch headers), cached under
``$MLX_HOME/kernels`` (default ``~/.cache/mlx/kernels``), loaded with ctypes. Where no compiler is
found or the build fails, ``library()`` returns None, one warning says why, and callers use their
torch reference. ``MLX_KERNELS=torch`` turns these off too.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger("mlx_kernels")

SOURCE = Path(__file__).with_name("_cpu_kernels.c")
# -ffp-contract=fast: a*b + c as one FMA (-std=c11 alone turns that off); -fno-trapping-math:
# lets `omp simd` loops with comparisons (the kernels' exp) run on vectors. No -ffast-math: sums
# keep their order outside the explicit `omp simd` reductions.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-fno-trapping-math", "-shared",
         "-fPIC", "-std=c11"]


def cache_dir() -> Path:
    home = os.environ.get("MLX_HOME") or Path.home() / ".cache" / "mlx"
    return Path(home).expanduser() / "kernels"


def _cpu_signature() -> str:
    """What ``-march=native`` compiles for: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            wanted = [line for line in f if line.startswith(("model name", "flags"))][:2]
        return "".join(wanted)
    except OSError:
        return platform.processor()


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    key = hashlib.sha256(b"\0".join(
        [source, " ".join(FLAGS).encode(), version.encode(), platform.machine().encode(),
         _cpu_signature().encode()])).hexdigest()[:16]
    target = cache_dir() / f"mlx_cpu_kernels_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # build next to the target, then rename: a concurrent process never loads a half-written file
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", partial, "-lm"],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed:\n{done.stderr[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def compiler() -> str | None:
    """The C compiler the kernels are built with: ``$CC``, else ``cc``, if found."""
    return shutil.which(os.environ.get("CC", "cc"))


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (no compiler, or the build failed: warned once)."""
    found = compiler()
    if found is None:
        logger.warning("no C compiler (cc, or $CC) found: mlx_kernels uses its torch references on "
                       "CPU, which are slower for paged decode; install gcc to get the native ones")
        return None
    try:
        import torch  # noqa: F401  (loads the libgomp the kernels then share)

        return declare(ctypes.CDLL(str(_build(found))))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        logger.warning("building mlx_kernels' native CPU kernels failed, using the torch references "
                       "instead: %s", e)
        return None


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` (a build of ``SOURCE``) with its functions' argument and result types set."""
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    # query, keys, values, tables, lens, cu_q (NULL: one query per sequence), out; batch, kv_heads,
    # group, head_dim, block_size, table_width, num_blocks, window; scale, softcap (0: none);
    # the caches' element type (KV_TYPES)
    lib.paged_attention_f32.restype = ctypes.c_int
    lib.paged_attention_f32.argtypes = [ptr] * 7 + [i64] * 8 + [f32] * 2 + [i64]
    lib.paged_attention_tiles.restype = ctypes.c_int
    lib.paged_attention_tiles.argtypes = []
    lib.swiglu_f32.restype = None
    lib.swiglu_f32.argtypes = [ptr] * 3 + [i64] * 3  # gate, up, out; rows, cols, row stride
    lib.quantize_rows_s8.restype = None
    lib.quantize_rows_s8.argtypes = [ptr] * 3 + [i64] * 2  # x, q, scale; rows, k
    lib.quantize_rows_u8.restype = None
    lib.quantize_rows_u8.argtypes = [ptr] * 3 + [i64] * 2  # x, q (+ 128), scale; rows, k
    lib.dequantize_s32_f32.restype = None
    # acc, row_scale, col_scale, bias (NULL: none), out; rows, n
    lib.dequantize_s32_f32.argtypes = [ptr] * 5 + [i64] * 2
    lib.rope_f32.restype = None
    # x, cos, sin, out; batch, heads, tokens, dim; x's and out's strides along b, h, t
    lib.rope_f32.argtypes = [ptr] * 4 + [i64] * 10
    lib.write_kv_cache_f32.restype = ctypes.c_int  # 0, or -1: a slot outside the cache
    # key, value, key_cache, value_cache, slots (int64); n, kv_heads, head_dim, slots in the
    # cache; key's and value's strides along n and head
    lib.write_kv_cache_f32.argtypes = [ptr] * 5 + [i64] * 8
    lib.rms_norm_f32.restype = None
    lib.rms_norm_f32.argtypes = [ptr] * 3 + [i64] * 2 + [f32]  # x, w, out; rows, h; eps
    lib.scale_rows_f32.restype = None
    lib.scale_rows_f32.argtypes = [ptr] * 3 + [i64] * 2  # y, row_scale, bias (NULL: none); rows, n
    lib.int8_group_linear_f32.restype = None
    # x, q, scale, bias (NULL: none), y; rows, n, k, group
    lib.int8_group_linear_f32.argtypes = [ptr] * 5 + [i64] * 4
    lib.w8a8_gemm_f32.restype = ctypes.c_int  # 0, or -1: cannot run here (y untouched)
    # xq, xscale, q, scale, bias (NULL: none), y; rows, n, k
    lib.w8a8_gemm_f32.argtypes = [ptr] * 6 + [i64] * 3
    lib.w8a8_gemm_narrow_f32.restype = ctypes.c_int
    # xu, xscale, q, offsets, scale, bias (NULL: none), y; rows, n, k
    lib.w8a8_gemm_narrow_f32.argtypes = [ptr] * 7 + [i64] * 3
    lib.int4_native_available.restype = ctypes.c_int
    lib.int4_native_available.argtypes = []
    lib.int4_group_linear_f32.restype = ctypes.c_int  # 0, or -1: cannot run here (y untouched)
    # x, q, scales, mins; wide (fp32 scales and mins, else fp16); bias (NULL: none), y; rows, n,
    # k, group
    lib.int4_group_linear_f32.argtypes = [ptr] * 4 + [i64] + [ptr] * 2 + [i64] * 4
    return lib
