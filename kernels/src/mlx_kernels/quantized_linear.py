"""Linear layers on quantized weights: int8 weight-only, int4 weight-only and W8A8.

Layouts (what a quantized model's buffers and checkpoints hold; ``N`` outputs, ``K`` inputs):

- int8 (symmetric): ``qweight`` int8 ``[N, K]`` in -127..127 and ``scale`` fp32 ``[N]`` (one per
  output channel) or ``[N, K // G]`` (one per group of ``G`` inputs: GGUF's Q8_0, ``G = 32``);
  ``w = qweight * scale``.
- int4 (groups of ``G`` inputs, asymmetric): ``qweight`` uint8 ``[N, K // 2]``, element ``2j`` of
  a row in byte ``j``'s low nibble and ``2j + 1`` in its high one, values 0..15; ``scales`` and
  ``mins`` fp16 ``[N, K // G]``; ``w = q * scale + min`` per group (GGUF's Q4_1 form; its Q4_0 is
  ``min = -8 * scale``).
- W8A8: the int8 weight layout; each activation row is quantized on the fly to int8 with its own
  scale (``max |x| / 127``) and the product runs on int8 with int32 sums.

The torch references dequantize and call ``F.linear`` (autograd flows to the input, as QLoRA
needs). On GPUs (and under ``MLX_KERNELS=triton``) int8 and int4 run a Triton dequant-matmul
(``_quantized_linear_triton``) in inference; W8A8 runs its reference there.

On CPU, in fp32 inference under ``MLX_KERNELS=auto``, up to ``INT8_FAST_ROWS`` rows, int8
runs the native loop ``int8_group_linear_f32`` on fp32 activations (per channel: one group of
all K inputs; GGUF's Q8_0: groups of 32). It asks for weight bytes 8 KiB ahead of its reads,
which the hardware prefetcher does not do for rows this short: over the built-in model's fused
weights, 2 threads, AVX-512 VNNI, 6.1 ms at one row against 11.4 ms for torch's
``_weight_int8pack_mm``; even at 16 rows, 10-20% slower at 32-128. It computes every row
alike, whatever else is in the batch, so a sequence's tokens do not depend on what it is
batched with (torch's kernel at a few rows and the fp32 GEMM beyond would differ by bf16
rounding). int4 with inputs in multiples of 64, up to ``INT4_NATIVE_ROWS`` rows, runs the native loop
``int4_group_linear_f32`` where the CPU has AVX-512 BF16 (or AVX2 + FMA + F16C: there the
nibbles are converted to fp32 and multiplied in FMAs, the same product): the input rounded to bf16, each
weight nibble made bf16 ``128 + q`` in registers, BF16 dot-products with fp32 sums, the scales
and mins as stored (fp16, or GGUF Q4_K's fp32); at one row 19-22 GB/s of weights against 14-17
for torch's kernel over the built-in model's fused weights, 15-25% slower than it from two
rows on, but batch-invariant as the int8 loop. Otherwise, up to ``INT4_FAST_ROWS`` rows, int4
runs torch's ``torch._weight_int4pack_mm_for_cpu``; it takes bf16 activations and bf16 scales (the input is rounded to bf16 and the output comes back
from bf16, as torchao's CPU layouts run it), as does ``_weight_int8pack_mm``, int8's kernel
where the native loop is not built. Measured on the built-in model's 211 weights (2 threads, Sapphire
Rapids), one row: fp32 19.5 ms, torch's int8 10.7, int4 (G=32) 5.0. Beyond those row counts a
dequantized fp32 GEMM wins. W8A8
quantizes each activation row in a native C loop and runs oneDNN's int8 GEMM on a prepacked
weight where the CPU has AMX (``torch._int_mm`` for a single row and without AMX), scaling back
in a second C loop; on an x86 CPU with AVX2 but neither VNNI nor AMX (AMD before Zen 4, Intel
before Ice Lake), where ``torch._int_mm`` runs a reference loop, the native GEMM
``w8a8_gemm_f32`` (``vpmaddwd``, exact int32 sums, the scaling fused) gives the same numbers.
"""

from __future__ import annotations

import functools
import platform
import sys

import torch
import torch.nn.functional as F

from mlx_kernels import _cpu_native
from mlx_kernels.dispatch import backend_for, native_cpu, setting
from mlx_kernels.linear import PACKED_ROWS_HINT, _identity

# up to this many rows torch's CPU int8 / int4 weight-only kernels beat dequantize + fp32 GEMM
# (28 of the built-in model's weights, 2 threads, Sapphire Rapids: int8 12.7 vs 22.4 ms at 64
# rows, even at 128, 44 vs 38 at 256; int4 42 vs 66 ms at 256, 63 vs 72 at 384, 86 vs 78 at 512)
INT8_FAST_ROWS = 128
INT4_FAST_ROWS = 384
# up to this many rows the native int4 loop (inputs in multiples of 64, AVX-512 BF16 or AVX2) runs, past
# them torch's int4 kernel (the built-in model's fused weights, 2 threads, per call with its
# dispatch: 5.3 vs 6.3 ms for all 120 at 1 row; 8.2 vs 7.1 at 2, 16.8 vs 14.2 at 8, 201 vs 166 at
# 128, 401 vs 331 at 256): slower from 2 rows on, but a row's result does not depend on its batch
# (a sequence served beside others decodes as it does alone)
INT4_NATIVE_ROWS = 256
INT4_GROUP_SIZES = (32, 64, 128)


def _constant_in_compiled_graphs(fn):
    """``torch.compiler.assume_constant_result``, without importing ``torch._dynamo`` when this
    module is imported (2.5 s here, which every ``mlx`` command paid, ``--help`` included). That
    decorator only marks the function, which dynamo reads when it traces a call to it;
    ``test_quantized_linear.py`` checks that the mark set here is still the one it sets."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


# ---- quantization (weights) -------------------------------------------------------------------

# int8 weights within +-NARROW_QMAX run W8A8's GEMM in vpmaddubsw's form where the CPU has no
# VNNI (w8a8_gemm_narrow_f32: its pair sums, 2 * 255 * 64, stay within int16)
NARROW_QMAX = 64
# the fractions of a row's max |w| tried as its int8 range (quantize_int8's clipping search)
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def quantize_int8(weight: torch.Tensor, clip_ratios: tuple[float, ...] = CLIP_RATIOS,
                  qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """``(qweight int8 [N, K], scale fp32 [N])``, symmetric per output channel in -qmax..qmax
    (``NARROW_QMAX``: the narrow range W7A8 stores). Each row's range is the fraction of its max
    |w| (of ``clip_ratios``) with the least squared error: clipping a few large values buys a
    finer step for the rest (on the built-in model perplexity +0.64% over fp32 instead of +1.05%
    with the plain max)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    best_q = best_scale = best_err = None
    for ratio in clip_ratios:
        scale = ratio * amax / qmax
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        q = torch.round(w * inv[:, None]).clamp_(-qmax, qmax)
        err = (q * scale[:, None] - w).square_().sum(dim=1)
        if best_q is None:
            best_q, best_scale, best_err = q, scale, err
            continue
        better = err < best_err
        best_q = torch.where(better[:, None], q, best_q)
        best_scale = torch.where(better, scale, best_scale)
        best_err = torch.minimum(err, best_err)
    return best_q.to(torch.int8), best_scale


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``qweight [..., K]`` times its scales: ``[...]`` (one per row) or ``[..., K // G]``."""
    q = qweight.to(torch.float32)
    if scale.dim() == qweight.dim() - 1:
        return (q * scale[..., None]).to(dtype)
    grouped = q.reshape(*q.shape[:-1], scale.shape[-1], -1) * scale[..., None]
    return grouped.reshape(q.shape).to(dtype)


def check_int4_shape(in_features: int, group_size: int, name: str = "the weight") -> None:
    """Raise a ValueError naming the valid choices where ``group_size`` cannot split the rows."""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size {group_size} is not supported; choose one of "
                         f"{', '.join(map(str, INT4_GROUP_SIZES))}")
    if in_features % group_size:
        fits = [g for g in INT4_GROUP_SIZES if in_features % g == 0]
        raise ValueError(
            f"int4 group size {group_size} does not divide the {in_features} input features of "
            f"{name}; " + (f"choose {' or '.join(map(str, fits))}" if fits else
                           "no supported group size does: leave this layer unquantized"))


def quantize_int4(weight: torch.Tensor, group_size: int = 32
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(qweight uint8 [N, K // 2], scales [N, K // G], mins [N, K // G])``: each group of
    ``group_size`` inputs spans its own [min, max] in 16 steps. Scales and mins are fp16 (as
    GGUF stores them: a quarter of the 4-bit data's size in fp32, an eighth in fp16); the values
    are rounded on the fp16 grid they define."""
    n, k = weight.shape
    check_int4_shape(k, group_size)
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    if max(high.abs().max().item(), low.abs().max().item()) > torch.finfo(torch.float16).max / 2:
        raise ValueError("weights beyond +-32752 do not fit int4's fp16 scales and minimums; "
                         "quantize this model with int8")
    scales, mins = ((high - low) / 15.0).half(), low.half()
    scale32 = scales.float()
    inv = torch.where(scale32 > 0, 1.0 / scale32, torch.zeros_like(scale32))
    q = torch.round((w - mins.float()[..., None]) * inv[..., None]).clamp_(0, 15).to(torch.uint8)
    q = q.reshape(n, k)
    return q[:, 0::2] | (q[:, 1::2] << 4), scales, mins


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """The 0..15 values ``[N, K]`` (uint8) of a packed int4 ``qweight [N, K // 2]``."""
    return torch.stack((qweight & 15, qweight >> 4), dim=-1).reshape(qweight.shape[0], -1)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                    dtype=torch.float32) -> torch.Tensor:
    n, groups = scales.shape
    q = unpack_int4(qweight).reshape(n, groups, -1).to(torch.float32)
    return (q * scales.float()[..., None] + mins.float()[..., None]).reshape(n, -1).to(dtype)


# ---- quantization (activations, W8A8) ---------------------------------------------------------

def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``x [M, K]`` to int8 with its own scale: ``(q int8 [M, K], scale [M])``."""
    x = x.float()
    amax = x.abs().amax(dim=1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return torch.round(x * inv[:, None]).to(torch.int8), amax / 127.0


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not native_cpu(x):
        return quantize_rows_reference(x)
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.int8)
    scale = torch.empty(x.shape[0], dtype=torch.float32)
    _cpu_native.library().quantize_rows_s8(x.data_ptr(), q.data_ptr(), scale.data_ptr(),
                                           x.shape[0], x.shape[1])
    return q, scale


# ---- CPU kernel layouts, made once per weight ---------------------------------------------------

class CpuLayout:
    """The form torch's CPU kernel takes a quantized weight in, made on first use and made again
    if the weight's tensors change (another tensor, or an in-place write)."""

    def __init__(self):
        self._source, self.data = None, None

    def get(self, make, *tensors):
        if torch.compiler.is_compiling():  # the compiler cannot tell tensors apart by address
            if self.data is None:
                raise RuntimeError("a quantized layer's CPU layout is made on its first eager "
                                   "call: run the model once before compiling it")
            return self.data
        source = tuple(map(_identity, tensors))  # as PackedWeight tells its weight apart
        if source != self._source:
            self.data, self._source = make(*tensors), source
        return self.data

    def __deepcopy__(self, memo):  # a copy belongs to copied tensors: it is made on first use
        return CpuLayout()


def aligned(t: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """``t`` contiguous at an address torch's vectorised CPU kernels can load from: a tensor read
    out of a safetensors file can start at any byte, and ``_weight_int8pack_mm`` crashes on one
    that is not 64-byte aligned (a fresh torch allocation always is)."""
    t = t.contiguous()
    return t if t.data_ptr() % alignment == 0 else t.clone()


def _int8_cpu_layout(qweight, scale):
    return aligned(qweight), scale.to(torch.bfloat16)


def _int4_cpu_layout(qweight, scales, mins):
    # torch's convention per group: w = (q - 8) * scale + zero
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(qweight).to(torch.int32), 1)
    scales, mins = scales.float(), mins.float()
    zeros = mins + 8.0 * scales
    scales_and_zeros = torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous()
    return packed, scales_and_zeros.to(torch.bfloat16)


def _path(x: torch.Tensor, rows: int, fast_rows: int) -> str:
    """Where a weight-only op runs: ``"cpu"`` (torch's CPU kernels: fp32 inference, up to
    ``fast_rows`` rows, MLX_KERNELS=auto), ``"triton"`` or ``"reference"``. The setting is read
    once per call: at a decode step's one row the op itself takes only some 25 us."""
    if rows == 0 or torch.is_grad_enabled():
        return "reference"
    if x.device.type == "cpu" and setting() == "auto":
        return "cpu" if x.dtype == torch.float32 and rows <= fast_rows else "reference"
    return "triton" if backend_for(x.device) == "triton" else "reference"


def _rows(x: torch.Tensor) -> tuple[int, torch.Tensor]:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return rows, x.reshape(rows, x.shape[-1])


def _triton_matmul(x, flat, qweight, scales, mins, bias):
    from mlx_kernels import _quantized_linear_triton

    y = _quantized_linear_triton.matmul(flat, qweight, scales, mins, bias)
    return y.view(*x.shape[:-1], qweight.shape[0])


# ---- the linear ops ---------------------------------------------------------------------------

def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None, *, cpu_layout: CpuLayout | None = None) -> torch.Tensor:
    """``F.linear(x, dequantize_int8(qweight, scale), bias)``."""
    rows, flat = _rows(x)
    path = _path(x, rows, INT8_FAST_ROWS)
    if path == "triton":
        return _triton_matmul(x, flat, qweight, scale, None, bias)
    if scale.dim() == 2:
        return _int8_group_linear(x, flat, rows, qweight, scale, bias, path == "cpu")
    if path == "cpu" and _native_built():
        # one scale per output channel: one group of all K inputs, fp32 activations (over the
        # built-in model's fused weights, 2 threads, against torch's kernel: 6.4 vs 11.3 ms at
        # 1 row, 13.2 vs 14.2 at 4, even at 16, 84.9 vs 77.4 at 32, 324 vs 270 at 128)
        return _int8_group_linear(x, flat, rows, qweight, scale.view(-1, 1), bias, True)
    if cpu_layout is not None and path == "cpu":
        q, scale16 = cpu_layout.get(_int8_cpu_layout, qweight, scale)
        y = torch.ops.aten._weight_int8pack_mm(flat.to(torch.bfloat16), q, scale16).float()
        if bias is not None:
            y = y.add_(bias)
        return y.view(*x.shape[:-1], qweight.shape[0])
    return F.linear(x, dequantize_int8(qweight, scale, x.dtype), bias)


@_constant_in_compiled_graphs  # built once per process: a constant to a compiled graph
def _native_built() -> bool:
    return _cpu_native.library() is not None


def _int8_group_linear(x, flat, rows, qweight, scale, bias, fast_cpu):
    if fast_cpu and torch.compiler.is_compiling():
        y = torch.ops.mlx_kernels.int8_group_linear(flat, qweight, scale, bias)
        return y.view(*x.shape[:-1], qweight.shape[0])
    if not (fast_cpu and native_cpu(x, scale)
            and (bias is None or native_cpu(bias))):
        return F.linear(x, dequantize_int8(qweight, scale, x.dtype), bias)
    y = _int8_native(flat, qweight, scale, bias)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], qweight.shape[0])


def _int8_native(x, qweight, scale, bias):
    """The native int8 loop on fp32 ``x [rows, k]`` (the op ``mlx_kernels::int8_group_linear``)."""
    x, qweight, scale = x.contiguous(), qweight.contiguous(), scale.contiguous()
    bias = None if bias is None else bias.contiguous()  # held: the kernel reads its memory
    (rows, k), n = x.shape, qweight.shape[0]
    y = torch.empty(rows, n, dtype=torch.float32)
    _cpu_native.library().int8_group_linear_f32(
        x.data_ptr(), qweight.data_ptr(), scale.data_ptr(),
        None if bias is None else bias.data_ptr(), y.data_ptr(), rows, n, k, k // scale.shape[1])
    return y


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                bias: torch.Tensor | None = None, *, cpu_layout: CpuLayout | None = None) -> torch.Tensor:
    """``F.linear(x, dequantize_int4(qweight, scales, mins), bias)``."""
    rows, flat = _rows(x)
    path = _path(x, rows, INT4_FAST_ROWS)
    if path == "triton":
        return _triton_matmul(x, flat, qweight, scales, mins, bias)
    if (path == "cpu" and rows <= INT4_NATIVE_ROWS and x.shape[-1] % 64 == 0
            and _int4_native_built()):
        return _int4_group_linear(x, flat, rows, qweight, scales, mins, bias)
    # torch's int4 CPU layout packs outputs in blocks of 16
    if cpu_layout is not None and path == "cpu" and qweight.shape[0] % 16 == 0:
        packed, scales_and_zeros = cpu_layout.get(_int4_cpu_layout, qweight, scales, mins)
        group_size = 2 * qweight.shape[1] // scales.shape[1]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(torch.bfloat16), packed, group_size,
                                                       scales_and_zeros).float()
        if bias is not None:
            y = y.add_(bias)
        return y.view(*x.shape[:-1], qweight.shape[0])
    return F.linear(x, dequantize_int4(qweight, scales, mins, x.dtype), bias)


@_constant_in_compiled_graphs  # built once per process: a constant to a compiled graph
def _int4_native_built() -> bool:
    lib = _cpu_native.library()
    return lib is not None and bool(lib.int4_native_available())


def _int4_group_linear(x, flat, rows, qweight, scales, mins, bias):
    """The native int4 loop, where ``int4_linear`` chose it (fp32 CPU inference, MLX_KERNELS=auto,
    the loop built)."""
    if not (scales.dtype == mins.dtype and scales.dtype in (torch.float16, torch.float32)
            and (bias is None or bias.dtype == torch.float32)):  # what the loop reads
        return F.linear(x, dequantize_int4(qweight, scales, mins, x.dtype), bias)
    if torch.compiler.is_compiling():
        y = torch.ops.mlx_kernels.int4_group_linear(flat, qweight, scales, mins, bias)
        return y.view(*x.shape[:-1], qweight.shape[0])
    y = _int4_native(flat, qweight, scales, mins, bias)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], qweight.shape[0])


def _int4_native(x, qweight, scales, mins, bias):
    """The native int4 loop on fp32 ``x [rows, k]`` (the op ``mlx_kernels::int4_group_linear``)."""
    x, qweight = x.contiguous(), qweight.contiguous()
    scales, mins = scales.contiguous(), mins.contiguous()
    bias = None if bias is None else bias.contiguous()  # held: the kernel reads its memory
    (rows, k), n = x.shape, qweight.shape[0]
    y = x.new_empty(rows, n)
    done = _cpu_native.library().int4_group_linear_f32(
        x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), mins.data_ptr(),
        scales.dtype is torch.float32, None if bias is None else bias.data_ptr(), y.data_ptr(),
        rows, n, k, k // scales.shape[1])
    if done != 0:
        raise MemoryError(f"the native int4 linear found no memory for {rows} x {k} inputs")
    return y


# The native loops as ops a compiled graph calls: inductor cannot trace their raw pointers (and
# would otherwise dequantize the whole weight at every step). A plain library op, not
# torch.library.custom_op, whose wrapper costs ~6 us a call: as much as the int4 loop itself at
# one row of a small weight, and a decode step makes ~120 such calls.
_OPS = torch.library.Library("mlx_kernels", "FRAGMENT")
_OPS.define("int8_group_linear(Tensor x, Tensor qweight, Tensor scale, Tensor? bias) -> Tensor")
_OPS.define("int4_group_linear(Tensor x, Tensor qweight, Tensor scales, Tensor mins, Tensor? bias) "
            "-> Tensor")
_OPS.define("w8a8_linear(Tensor x, Tensor qweight, Tensor scale, Tensor? bias) -> Tensor")
_OPS.impl("int8_group_linear", _int8_native, "CPU")
_OPS.impl("int4_group_linear", _int4_native, "CPU")
_OPS.impl("w8a8_linear", lambda *args: _w8a8_native(*args), "CPU")  # defined further down


@torch.library.register_fake("mlx_kernels::int8_group_linear")
def _(x, qweight, scale, bias):
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.register_fake("mlx_kernels::int4_group_linear")
def _(x, qweight, scales, mins, bias):
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.register_fake("mlx_kernels::w8a8_linear")
def _(x, qweight, scale, bias):
    return x.new_empty(x.shape[0], qweight.shape[0])


def w8a8_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    rows, flat = _rows(x)
    xq, xscale = quantize_rows_reference(flat)
    acc = (xq.double() @ qweight.double().t()).float()  # exact: the int32 sum
    return _scaled_back(acc, xscale, scale, bias, x)


def _scaled_back(acc, xscale, scale, bias, x):
    """W8A8's int32 sums ``[rows, out]`` times the row and output scales, plus the bias, in
    x's dtype and shape."""
    y = acc * (xscale[:, None] * scale[None, :].float())
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).view(*x.shape[:-1], acc.shape[1])


@functools.cache
def _cpu_has_amx() -> bool:
    """Whether this CPU runs AMX tiles (torch asks the kernel for them). Where torch has no
    such probe, assume it does, as before the probe."""
    probe = getattr(torch._C._cpu, "_init_amx", None)
    return True if probe is None else bool(probe())


def _w8a8_cpu_layout(qweight, scale):
    """oneDNN's packed int8 weight (``onednn.qlinear_prepack``), or None where this torch has
    no such op or the CPU no AMX (then ``torch._int_mm`` runs on the weight as it is): with
    AVX-512 VNNI alone, oneDNN 3.12 runs this matmul (per-channel weight scales and zero
    points) in its reference loop, ``ref_int8``: 64 rows x 576 x 1536 took 950 ms here against
    0.24 ms for ``torch._int_mm``."""
    if not _cpu_has_amx():
        return None
    try:
        packed = torch.ops.onednn.qlinear_prepack(aligned(qweight), [PACKED_ROWS_HINT,
                                                                     qweight.shape[1]])
    except (AttributeError, RuntimeError):
        return None
    zeros = torch.zeros(qweight.shape[0], dtype=torch.int64)
    return packed, scale.float().contiguous(), zeros


@_constant_in_compiled_graphs  # one answer per process: a constant to a compiled graph
def _w8a8_gemm_native() -> bool:
    """Whether W8A8's GEMM runs the native ``w8a8_gemm_f32`` (AVX2, exact int32 sums, fused
    scaling) instead of ``torch._int_mm``: on an x86 CPU without int8 dot-product instructions
    (AVX-512 VNNI, AVX-VNNI or AMX), where ``torch._int_mm`` runs a reference loop (2 GOPS on an
    AVX2 AMD EPYC, 25x slower than its fp32 GEMM; the native GEMM runs 130-175 GOPS there at
    64-1024 rows, against fp32's 85-120 GFLOP/s)."""
    return _w8a8_gemm_native_here()


@functools.cache
def _w8a8_gemm_native_here() -> bool:
    flags = set(_cpu_native._cpu_signature().split())
    return ("avx2" in flags and not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}
            and _cpu_native.library() is not None)


def narrow_offsets(qweight: torch.Tensor) -> torch.Tensor | None:
    """For an int8 weight within +-64 (``quantize_int8(..., qmax=NARROW_QMAX)``) whose rows are
    whole steps of 32: ``128 * sum(q[j])`` per row (int32), what ``w8a8_gemm_narrow_f32`` takes
    out of its sums; else None (the weight runs on ``w8a8_gemm_f32``)."""
    if qweight.shape[1] % 32 or not qweight.numel():
        return None
    if qweight.min() < -NARROW_QMAX or qweight.max() > NARROW_QMAX:
        return None
    return (qweight.sum(dim=1, dtype=torch.int32) * 128).contiguous()


def _w8a8_native(x, qweight, scale, bias, offsets=None):
    """W8A8 on fp32 ``x [rows, k]`` by the native GEMM (the op ``mlx_kernels::w8a8_linear``):
    the rows quantized as ``quantize_rows``, the int32 sums and the scaling as ``torch._int_mm``
    and ``dequantize_s32_f32`` give them, bit for bit. With ``offsets`` (``narrow_offsets`` of a
    weight within +-64) the narrow GEMM gives the same numbers, faster."""
    x, qweight, scale = x.contiguous(), qweight.contiguous(), scale.float().contiguous()
    bias = None if bias is None else bias.contiguous()  # held: the kernel reads its memory
    lib = _cpu_native.library()
    y = x.new_empty(x.shape[0], qweight.shape[0])
    bias_ptr = None if bias is None else bias.data_ptr()
    if offsets is None:
        xq, xscale = quantize_rows(x)
        done = lib.w8a8_gemm_f32(xq.data_ptr(), xscale.data_ptr(), qweight.data_ptr(),
                                 scale.data_ptr(), bias_ptr, y.data_ptr(), x.shape[0],
                                 qweight.shape[0], x.shape[1])
    else:
        xu = torch.empty(x.shape, dtype=torch.uint8)
        xscale = torch.empty(x.shape[0], dtype=torch.float32)
        lib.quantize_rows_u8(x.data_ptr(), xu.data_ptr(), xscale.data_ptr(), *x.shape)
        done = lib.w8a8_gemm_narrow_f32(xu.data_ptr(), xscale.data_ptr(), qweight.data_ptr(),
                                        offsets.data_ptr(), scale.data_ptr(), bias_ptr,
                                        y.data_ptr(), x.shape[0], qweight.shape[0], x.shape[1])
    if done != 0:
        raise RuntimeError(f"the native W8A8 GEMM cannot run {tuple(x.shape)} x "
                           f"{tuple(qweight.shape)} here (it needs AVX2 and inputs in multiples of 16)")
    return y


def _int_mm_on_gpu(x: torch.Tensor, qweight: torch.Tensor) -> bool:
    # torch._int_mm on CUDA takes K and N in multiples of 8
    return x.device.type == "cuda" and qweight.shape[0] % 8 == 0 and qweight.shape[1] % 8 == 0


def _w8a8_int_mm(x, flat, rows, qweight, scale, bias):
    """The reference's arithmetic with the int32 sums of ``torch._int_mm``: on a GPU (cuBLAS's
    int8 GEMM, 0.9-1.5x bf16 cuBLAS on an H200) and in a compiled graph (inductor fuses the
    activations' quantization and the scaling around it)."""
    xq, xscale = quantize_rows_reference(flat)
    if x.device.type == "cuda" and rows <= 16:  # cuBLAS's int8 GEMM takes more than 16 rows
        xq = torch.cat([xq, xq.new_zeros(32 - rows, xq.shape[1])])
    return _scaled_back(torch._int_mm(xq, qweight.t())[:rows], xscale, scale, bias, x)


def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None, *, cpu_layout: CpuLayout | None = None) -> torch.Tensor:
    """``x`` quantized per row to int8 (dynamic), times the int8 weight, in int32, scaled back.

    On CPU with a ``cpu_layout`` the GEMM runs on oneDNN's prepacked int8 weight
    (``onednn.qlinear_pointwise``, which also applies the weight scales: up to 2x
    ``torch._int_mm`` at 256-2048 rows here, the same int32 sums), else (and for a single row)
    ``torch._int_mm``. On an x86 CPU with AVX2 but no int8 dot-product instructions (no VNNI or
    AMX, where ``torch._int_mm`` runs a reference loop) the native GEMM ``w8a8_gemm_f32`` (the
    op ``mlx_kernels::w8a8_linear`` under ``torch.compile``), bit for bit the same numbers. On a
    GPU, ``torch._int_mm`` (cuBLAS's int8 GEMM)."""
    rows, flat = _rows(x)
    if rows and not torch.is_grad_enabled() and (
            torch.compiler.is_compiling() or _int_mm_on_gpu(x, qweight)):
        if (x.device.type == "cpu" and x.dtype == torch.float32 and setting() == "auto"
                and _w8a8_gemm_native() and qweight.shape[1] % 16 == 0):
            y = torch.ops.mlx_kernels.w8a8_linear(flat, qweight, scale, bias)
            return y.view(*x.shape[:-1], qweight.shape[0])
        return _w8a8_int_mm(x, flat, rows, qweight, scale, bias)
    if not (rows and not torch.is_grad_enabled() and native_cpu(x, scale)
            and (bias is None or native_cpu(bias))):
        return w8a8_linear_reference(x, qweight, scale, bias)
    if _w8a8_gemm_native() and qweight.shape[1] % 16 == 0:
        offsets = None if cpu_layout is None else cpu_layout.get(narrow_offsets, qweight)
        return _w8a8_native(flat, qweight, scale, bias, offsets).view(*x.shape[:-1],
                                                                      qweight.shape[0])
    lib = _cpu_native.library()
    xq, xscale = quantize_rows(flat)
    bias = None if bias is None else bias.contiguous()  # held: the kernels read its memory
    bias_ptr = None if bias is None else bias.data_ptr()
    # one row: oneDNN takes a path ~7x slower than _int_mm's over the built-in model's weights
    # (95.7 vs 13.6 ms here); from two rows on the packed weight is as fast or faster
    packed = (cpu_layout.get(_w8a8_cpu_layout, qweight, scale)
              if cpu_layout is not None and rows > 1 else None)
    if packed is not None:
        weight, wscale, zeros = packed
        y = torch.ops.onednn.qlinear_pointwise(xq, 1.0, 0, weight, wscale, zeros, None, 1.0, 0,
                                               torch.float32, "none", [None], "")
        lib.scale_rows_f32(y.data_ptr(), xscale.data_ptr(), bias_ptr, rows, y.shape[1])
        return y.view(*x.shape[:-1], qweight.shape[0])
    acc = torch._int_mm(xq, qweight.t())
    y = torch.empty(acc.shape, dtype=torch.float32)
    scale = scale.contiguous()
    lib.dequantize_s32_f32(acc.data_ptr(), xscale.data_ptr(), scale.data_ptr(), bias_ptr,
                           y.data_ptr(), rows, acc.shape[1])
    return y.view(*x.shape[:-1], qweight.shape[0])


# ---- what runs on this CPU ----------------------------------------------------------------------

# the x86 features (as /proc/cpuinfo names them) that decide which quantized kernels run
CPU_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                "avx512_bf16", "amx_int8", "amx_bf16")
_INT4_LOOPS = {2: "native loop: AVX-512 BF16 dot products", 1: "native loop: AVX2 fp32 FMAs"}
REFERENCE_KERNEL = "torch reference (dequantized weights)"


def cpu_kernels() -> dict:
    """This CPU (its model name and the ``CPU_FEATURES`` it has) and the kernel each quantized
    linear op runs on it in fp32 inference (under ``MLX_KERNELS=torch``, every op's reference):
    the dispatch's own predicates, asked. Quantized speed ratios move with these (``mlx bench
    quant`` and ``quant-serve`` record them beside their figures)."""
    signature = _cpu_native._cpu_signature()
    model = next((line.split(":", 1)[1].strip() for line in signature.splitlines()
                  if line.startswith("model name")), None)
    flags = set(signature.split())
    kernels = _kernels_here(flags) if setting() == "auto" else dict.fromkeys(
        ("int8", "int4", "w8a8"), REFERENCE_KERNEL)  # MLX_KERNELS=torch: every op's reference
    return {"cpu": model or platform.processor() or platform.machine(),
            "features": [f for f in CPU_FEATURES if f in flags], **kernels}


def _kernels_here(flags: set[str]) -> dict:
    """Each op's kernel under MLX_KERNELS=auto: where the native library is not built, int8 and
    int4 take torch's packed kernels and W8A8 its reference (``native_cpu`` is False)."""
    lib = _cpu_native.library()
    if lib is None:
        return {"int8": "torch _weight_int8pack_mm", "int4": "torch _weight_int4pack_mm_for_cpu",
                "w8a8": REFERENCE_KERNEL}
    # the C int8 loop's own choice: AVX-512F, else AVX2 with FMA, else portable C
    int8 = "native loop: " + ("AVX-512" if "avx512f" in flags else
                              "AVX2" if {"avx2", "fma"} <= flags else "portable C")
    int4 = _INT4_LOOPS.get(lib.int4_native_available(), "torch _weight_int4pack_mm_for_cpu")
    if _w8a8_gemm_native():
        w8a8 = "native GEMM: AVX2 vpmaddwd (W7A8's narrow weights: vpmaddubsw)"
    elif _cpu_has_amx():
        w8a8 = "oneDNN's packed int8 weight (AMX); torch._int_mm at one row"
    else:
        w8a8 = "torch._int_mm"
    return {"int8": int8, "int4": int4, "w8a8": w8a8}


def cpu_kernels_line(info: dict) -> str:
    """``cpu_kernels()``'s answer as one line, as the benchmarks print it."""
    return (f"{info['cpu']} ({', '.join(info['features']) or 'none of ' + ', '.join(CPU_FEATURES)}):"
            f" int8 {info['int8']}; int4 {info['int4']}; W8A8 {info['w8a8']}")
