"""GPU check of mlx_kernels' Triton kernels: each entry point against its torch reference (fp32 and
bf16, odd shapes, backward where there is one), and the int8/int4 dequant-matmul's speed against
cuBLAS bf16 and torch's int8 GEMMs. On a CUDA machine (kernels compiled; TRITON_INTERPRET dropped):

    PYTHONPATH=kernels/src:packages/core/src python3 benchmarks/gpu_kernels_check.py --out gpu.json

``--device cpu --smoke`` checks the script itself: small shapes under the Triton interpreter, one
timing shape. MLX_KERNELS=triton throughout; a case where no ``_*_triton`` launcher ran fails.
Tolerances are tests/kernels' (fp32 1e-5, bf16 2e-2; fp32 GEMMs 1e-4/1e-5), atol scaled by
max(1, max|reference|) as the cross-entropy test scales its loss's. A case that raises is recorded
with its traceback's tail; cases past the time budget are skipped. Output: a table, JSON at --out
(written after each section); exit status 1 if a case failed. Imports torch, triton, mlx_kernels.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import statistics
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from itertools import product

_early = argparse.ArgumentParser(add_help=False)
_early.add_argument("--device", default="cuda")
DEVICE = _early.parse_known_args()[0].device
# set before triton (and so any kernel) is imported: the interpreter on CPU only
os.environ["MLX_KERNELS"] = "triton"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

FP32, BF16 = torch.float32, torch.bfloat16
DTYPES, DEV = (FP32, BF16), torch.device(DEVICE)
TOL = {FP32: (1e-5, 1e-5), BF16: (2e-2, 2e-2)}  # tests/kernels/conftest.py
GEMM_TOL = {FP32: (1e-4, 1e-5), BF16: (2e-2, 2e-2)}  # test_quantized_linear, test_lora, test_moe
LAUNCHERS = ("quantized_linear", "nf4", "rms_norm", "rope", "swiglu", "geglu", "lora",
             "cross_entropy", "paged_attention", "varlen_attention", "kv_cache", "moe")
RESULTS: dict = {"meta": {}, "correctness": [], "speed": []}


def mod(name: str):
    """``mlx_kernels.<name>`` as a module (the lazy package's attribute of that name may be the op)."""
    return importlib.import_module(f"mlx_kernels.{name}")


def rand(*shape, dtype=FP32, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).to(dtype)


def cumsum0(counts):
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32, device=DEV)


def tail(exc: BaseException, lines: int = 6) -> list[str]:
    return "".join(traceback.format_exception(exc)).rstrip().splitlines()[-lines:]


@contextmanager
def patched(setting=None, count=None):
    """MLX_KERNELS=``setting`` while inside; with ``count`` (a list), ``count[0]`` counts calls
    into the public functions of mlx_kernels' ``_*_triton`` launcher modules."""
    saved, env = [], os.environ["MLX_KERNELS"]
    for name in LAUNCHERS if count is not None else ():
        try:
            module = mod(f"_{name}_triton")
        except Exception:  # noqa: BLE001 - its own cases fail on the import
            continue
        saved += [(module, attr, fn) for attr, fn in vars(module).items()
                  if inspect.isfunction(fn) and fn.__module__ == module.__name__ and attr[0] != "_"]

    def counted(fn):
        def wrapper(*args, **kwargs):
            count[0] += 1
            return fn(*args, **kwargs)
        return wrapper

    for module, attr, fn in saved:
        setattr(module, attr, counted(fn))
    os.environ["MLX_KERNELS"] = setting or env
    try:
        yield
    finally:
        os.environ["MLX_KERNELS"] = env
        for module, attr, fn in saved:
            setattr(module, attr, fn)


def math_sdpa():
    """The references' SDPA on its exact math backend rather than a fused CUDA kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH) if DEV.type == "cuda" else nullcontext()


def grads_of(fn, inputs, dy, need=None):
    """``[out, *grads of the inputs flagged in need (default all)]`` for the output gradient dy."""
    need = need or [1] * len(inputs)
    leaves = [t.detach().clone().requires_grad_(bool(g)) for t, g in zip(inputs, need, strict=True)]
    out = fn(*leaves)
    out.backward(dy)
    return [out.detach(), *(t.grad for t in leaves if t.requires_grad)]


def both(labels, ours, ref, inputs, dy, need=None):
    """Checks ``(label, got, want)`` of two functions' outputs and input gradients."""
    return list(zip(labels, grads_of(ours, inputs, dy, need), grads_of(ref, inputs, dy, need), strict=True))


def run_case(section, name, dtype, fn, deadline) -> None:
    """Run ``fn() -> [(label, got, want[, atol, rtol])]`` (default: TOL[dtype]); never raises."""
    entry = {"section": section, "case": name, "dtype": str(dtype).replace("torch.", "")}
    RESULTS["correctness"].append(entry)
    if time.monotonic() > deadline:
        return entry.update(passed=None, error="skipped: time budget spent")
    torch.manual_seed(0)
    try:
        calls = [0]
        with patched(count=calls):
            checks = fn()
        errors, ok = {}, True
        for label, got, want, *tol in checks:
            atol, rtol = tol or TOL[dtype]
            if got.shape != want.shape:
                raise AssertionError(f"{label}: shape {tuple(got.shape)} != {tuple(want.shape)}")
            g, w = got.detach().float(), want.detach().float()
            err, scale = (g - w).abs(), max(1.0, w.abs().max().item() if w.numel() else 0.0)
            errors[label] = err.max().item() if err.numel() else 0.0
            ok &= bool((err <= atol * scale + rtol * w.abs()).all())  # a nan anywhere fails
        entry.update(passed=ok and calls[0] > 0, max_abs_err=max(errors.values()), errors=errors,
                     triton_calls=calls[0])
        if not calls[0]:
            entry["error"] = "no Triton launcher ran: dispatch chose the torch reference"
    except Exception as e:  # noqa: BLE001 - recorded; the run goes on
        entry.update(passed=False, error=f"{type(e).__name__}: {e}"[:500], traceback=tail(e))
    shown = f"err={entry['max_abs_err']:.2e}" if "max_abs_err" in entry else entry["error"][:100]
    print(f"{'PASS' if entry['passed'] else 'FAIL'} {section:26s} {name:46s} {entry['dtype']:8s} {shown}",
          flush=True)


# ---- correctness cases: generators of (section, name, dtype, fn) ------------------------------

def quantized_cases(small):
    ql = mod("quantized_linear")
    kinds = {"int8": (None, 200), "int8_g32": (32, 224), "int4_g32": (32, 224), "int4_g64": (64, 192),
             "int4_g128": (128, 384)}  # (group, K); N = 97
    for (kind, (group, k)), m, dtype in product(kinds.items(), (1, 17) if small else (1, 3, 17, 128), DTYPES):
        def fn(kind=kind, group=group, k=k, m=m, dtype=dtype):
            x, w, b = rand(m, k, dtype=dtype), rand(97, k, scale=k**-0.5), rand(97, dtype=dtype)
            b = b if m in (3, 128) else None
            with torch.inference_mode():  # the Triton path is inference-only
                if kind.startswith("int4"):
                    packed = ql.quantize_int4(w, group)
                    got, deq = ql.int4_linear(x, *packed, b), ql.dequantize_int4(*packed, dtype)
                else:
                    q, s = ql.quantize_int8(w)
                    if group:  # GGUF Q8_0's form: a scale per group of inputs
                        s = s[:, None].repeat(1, k // group) * torch.rand(97, k // group, device=DEV)
                    got, deq = ql.int8_linear(x, q, s, b), ql.dequantize_int8(q, s, dtype)
                return [("out", got, F.linear(x, deq, b), *GEMM_TOL[dtype])]
        yield "quantized_linear", f"{kind} M={m} N=97 K={k}{' +bias' if m in (3, 128) else ''}", dtype, fn


def nf4_cases(small):
    n4 = mod("nf4")
    shapes = [((1, 96), (70, 96)), ((3, 5, 96), (70, 96)), ((17, 100), (48, 100)),
              ((4, 128), (300, 128))] + (not small) * [((128, 576), (1536, 576))]
    for (xs, ws), dtype in product(shapes, DTYPES):
        def fn(xs=xs, ws=ws, dtype=dtype):
            q = n4.nf4_quantize(rand(*ws, dtype=dtype, scale=ws[1] ** -0.5))
            x, b, dy = rand(*xs, dtype=dtype), rand(ws[0], dtype=dtype), rand(*xs[:-1], ws[0], dtype=dtype)
            # exact, as the test says; the interpreter's fp32 -> bf16 casts truncate: 1 ulp there
            exact = (0.0, 0.0) if dtype == FP32 or DEV.type == "cuda" else (0.0, 2**-7)
            return both(("out", "dx", "dbias"), lambda x, b: n4.nf4_matmul(x, q, b),
                        lambda x, b: F.linear(x, n4.nf4_dequantize_reference(q).to(dtype), b), (x, b), dy) + [
                ("dequantize", n4.nf4_dequantize(q), n4.nf4_dequantize_reference(q), *exact)]
        yield "nf4_matmul", f"x{xs} W{ws} +bias", dtype, fn


def elementwise_cases(small):
    rn, rp, sw, gg = mod("rms_norm"), mod("rope"), mod("swiglu"), mod("geglu")
    for shape, dtype in product([(1, 5), (6, 7, 123), (300, 64)] + (not small) * [(17, 576), (128, 4096)], DTYPES):
        def fn(shape=shape, dtype=dtype):
            x, w, dy = rand(*shape, dtype=dtype), rand(shape[-1], dtype=dtype), rand(*shape, dtype=dtype)
            out, dx, dw = both(("out", "dx", "dw"), lambda a, b: rn.rms_norm(a, b, 1e-6),
                               lambda a, b: rn.rms_norm_reference(a, b, 1e-6), (x, w), dy)
            atol, rtol = TOL[dtype]  # dW sums over rows: 10x atol in bf16, as the test allows
            return [out, dx, (*dw, atol * (10 if dtype == BF16 else 1), rtol)]
        yield "rms_norm", f"{shape}", dtype, fn
    for (b, h, t, d), dtype in product([(1, 5, 3, 16), (2, 3, 7, 24), (3, 1, 11, 6)]
                                       + (not small) * [(1, 9, 17, 64), (2, 32, 128, 128)], DTYPES):
        def fn(b=b, h=h, t=t, d=d, dtype=dtype):
            inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=DEV).float() / d))
            pos = torch.arange(t, device=DEV)[None, :, None] + torch.arange(b, device=DEV)[:, None, None]
            emb = torch.cat([pos * inv_freq, pos * inv_freq], dim=-1)
            cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
            x = rand(b, t, h, d, dtype=dtype).transpose(1, 2)  # not contiguous, as attention's
            return both(("out", "dx"), lambda a: rp.rope(a, cos, sin), lambda a: rp.rope_reference(a, cos, sin),
                        (x,), rand(b, h, t, d, dtype=dtype))
        yield "rope", f"B,H,T,D=({b},{h},{t},{d}) strided x", dtype, fn
    shapes = [(431,), (3, 1024), (6, 42, 123)] + (not small) * [(17, 1536), (128, 11008)]
    for op, shape, dtype in product(("swiglu", "gelu_tanh", "geglu"), shapes, DTYPES):
        def fn(op=op, shape=shape, dtype=dtype):
            g, u, dy = (rand(*shape, dtype=dtype) for _ in range(3))
            ours, ref, inputs = {"swiglu": (sw.swiglu, lambda a, b: F.silu(a) * b, (g, u)),
                                 "gelu_tanh": (gg.gelu_tanh, lambda a: gg.geglu_reference(a, None), (g,)),
                                 "geglu": (gg.geglu, gg.geglu_reference, (g, u))}[op]
            return both(("out", "dgate", "dup")[:len(inputs) + 1], ours, ref, inputs, dy)
        yield op, f"{shape}", dtype, fn


def lora_cases(small):
    lo = mod("lora")
    shapes = [((1, 64), 50, 8), ((2, 7, 45), 70, 6), ((33, 64), 50, 16), ((3, 11), 37, 64)]
    needs = {"all": (1, 1, 1, 1, 1), "frozen_base": (1, 0, 1, 1, 0), "no_dx": (0, 0, 1, 1, 1)}
    for (xs, n, r), (grads, need), dtype in product(shapes + (not small) * [((128, 576), 1536, 16)],
                                                    needs.items(), DTYPES):
        def fn(xs=xs, n=n, r=r, need=need, dtype=dtype):
            k = xs[-1]  # weights at their initialisation scale: O(1) outputs and gradients
            inputs = [rand(*xs, dtype=dtype), rand(n, k, dtype=dtype, scale=k**-0.5),
                      rand(r, k, dtype=dtype, scale=k**-0.5), rand(n, r, dtype=dtype, scale=r**-0.5),
                      rand(n, dtype=dtype)]
            labels = ["out"] + [g for g, on in zip(("dx", "dW", "dA", "dB", "dbias"), need, strict=True) if on]
            return both(labels, lambda x, w, a, b, bias: lo.lora_linear(x, w, a, b, 0.5, bias),
                        lambda x, w, a, b, bias: lo.lora_linear_reference(x, w, a, b, 0.5, bias),
                        inputs, rand(*xs[:-1], n, dtype=dtype), need)
        yield "lora_linear", f"x{xs} out={n} r={r} grads={grads} +bias", dtype, fn
    for layout, dtype in product(("fused", "added_to_transposed_base"), DTYPES):
        def fn(layout=layout, dtype=dtype):
            x, w, bias = rand(9, 45, dtype=dtype), rand(70, 45, dtype=dtype, scale=45**-0.5), rand(70, dtype=dtype)
            a, b = rand(3, 6, 45, dtype=dtype, scale=45**-0.5), rand(3, 70, 6, dtype=dtype, scale=6**-0.5)
            ids, s = torch.tensor([0, 2, -1, 1, 1, 0, -1, 2, 2], device=DEV), torch.tensor([0.5, 1.0, 2.0], device=DEV)
            got = (lo.lora_linear_multi(x, w, a, b, ids, s, bias) if layout == "fused" else
                   lo.add_lora_multi(x, (w @ x.t()).t() + bias, a, b, ids, s))
            return [("out", got, lo.lora_linear_multi_reference(x, w, a, b, ids, s, bias), *GEMM_TOL[dtype])]
        yield "lora_linear_multi", f"9 rows, 3 adapters r=6, {layout}", dtype, fn


def loss_cases(small):
    ce = mod("fused_linear_cross_entropy")
    configs = [(131, 24, 1500, 64)] + (not small) * [(1024, 576, 49152, None)]
    for (n, h, v, chunk), ls, red, dtype in product(configs, (0.0, 0.1), ("mean", "sum"), DTYPES):
        def fn(n=n, h=h, v=v, chunk=chunk, ls=ls, red=red, dtype=dtype):
            inputs = (rand(n, h, dtype=dtype), rand(v, h, dtype=dtype, scale=h**-0.5), rand(v, dtype=dtype))
            y = torch.randint(0, v, (n,), device=DEV)
            y[::7] = -100  # ignored rows

            def loss(choice):  # as the test: the op under MLX_KERNELS=torch is the reference
                with patched(choice):
                    return grads_of(lambda h, w, b: ce.fused_linear_cross_entropy(
                        h, w, y, bias=b, chunk_size=chunk, label_smoothing=ls, reduction=red), inputs, None)
            return list(zip(("loss", "dh", "dW", "dbias"), loss("triton"), loss("torch"), strict=True))
        yield "fused_linear_cross_entropy", f"N={n} H={h} V={v} smoothing={ls} {red}", dtype, fn


def paged_cache(hkv, d, block, num_blocks, lengths, dtype):
    """Empty caches, tables for ``lengths`` tokens in shuffled blocks, the tokens' keys, values and
    slots (as tests/kernels/test_paged_attention.py builds them)."""
    kc = torch.zeros(num_blocks, block, hkv, d, dtype=dtype, device=DEV)
    tables = torch.full((len(lengths), max(-(-n // block) for n in lengths) + 1), -1, dtype=torch.int32)
    free, slots = torch.randperm(num_blocks).tolist(), []
    for i, n in enumerate(lengths):
        blocks = [free.pop() for _ in range(-(-n // block))]
        tables[i, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        slots += [blocks[t // block] * block + t % block for t in range(n)]
    k, v = (rand(len(slots), hkv, d, dtype=dtype) for _ in range(2))
    return kc, torch.zeros_like(kc), tables.to(DEV), k, v, torch.tensor(slots, device=DEV)


def attention_cases(small):
    pa, va, kv = mod("paged_attention"), mod("varlen_attention"), mod("kv_cache")
    # (heads, kv_heads, head_dim, block, num_blocks, lengths); the write, then decode on that cache
    configs = [(6, 2, 24, 4, 24, [5, 11, 1, 16])] + (not small) * [(32, 8, 128, 16, 120, [1, 17, 300, 1000])]
    for (hq, hkv, d, block, nb, lengths), section, dtype in product(configs, ("kv_cache", "paged_attention"), DTYPES):
        def fn(hq=hq, hkv=hkv, d=d, block=block, nb=nb, lengths=lengths, section=section, dtype=dtype):
            kc, vc, tables, k, v, slots = paged_cache(hkv, d, block, nb, lengths, dtype)
            slots[-2] = -1  # padding: not written
            ref_k, ref_v = kc.clone(), vc.clone()
            kv.write_kv_cache_reference(k, v, ref_k, ref_v, slots)
            if section == "kv_cache":
                kv.write_kv_cache(k, v, kc, vc, slots)
                return [("key_cache", kc, ref_k, 0.0, 0.0), ("value_cache", vc, ref_v, 0.0, 0.0)]
            q, lens = rand(len(lengths), hq, d, dtype=dtype), torch.tensor(lengths, dtype=torch.int32, device=DEV)
            with math_sdpa():
                want = [pa.paged_attention_decode_reference(q, ref_k, ref_v, tables, lens, scale=d**-0.5,
                                                            sliding_window=win) for win in (None, 6)]
            got = [pa.paged_attention_decode(q, ref_k, ref_v, tables, lens, sliding_window=win) for win in (None, 6)]
            return list(zip(("out", "out_window6"), got, want, strict=True))
        yield section, f"H={hq}/{hkv} D={d} block={block} lens={lengths}", dtype, fn
    packed = [(4, 2, 24, [5, 33, 1, 17])] + (not small) * [(32, 8, 128, [1, 100, 513, 37])]
    for (hq, hkv, d, lengths), causal, window, dtype in product(packed, (True, False), (None, 6), DTYPES):
        def fn(hq=hq, hkv=hkv, d=d, lengths=lengths, causal=causal, window=window, dtype=dtype):
            cu, total = cumsum0(lengths), sum(lengths)
            q, k, v = rand(total, hq, d, dtype=dtype), rand(total, hkv, d, dtype=dtype), rand(total, hkv, d, dtype=dtype)
            got = va.varlen_attention(q, k, v, cu, cu, causal=causal, sliding_window=window)
            with math_sdpa():
                return [("out", got, va.varlen_attention_reference(q, k, v, cu, cu, causal=causal,
                                                                   sliding_window=window))]
        yield "varlen_attention", f"H={hq}/{hkv} D={d} {lengths} causal={causal} win={window}", dtype, fn
    for window, dtype in product((None, 5), DTYPES):
        def fn(window=window, dtype=dtype):
            kc, vc, q = rand(40, 4, 2, 24, dtype=dtype), rand(40, 4, 2, 24, dtype=dtype), rand(25, 4, 24, dtype=dtype)
            cu_q, cu_k = cumsum0([4, 20, 1]), cumsum0([9, 20, 3])  # cached prefixes of 5, 0 and 2 tokens
            tables = torch.randperm(40)[:18].view(3, 6).int().to(DEV)
            got = va.varlen_attention(q, kc, vc, cu_q, cu_k, block_tables=tables, sliding_window=window)
            with math_sdpa():
                want = va.varlen_attention_reference(q, kc, vc, cu_q, cu_k, block_tables=tables, sliding_window=window)
            last = cu_q[1:].long() - 1  # each sequence's last query is one decode step
            decode = pa.paged_attention_decode(q[last], kc, vc, tables, cu_k.diff(), sliding_window=window)
            return [("out", got, want), ("last_vs_decode", got[last], decode)]
        yield "varlen_attention", f"paged prefix, keys [9,20,3] win={window}", dtype, fn


def moe_cases(small):
    mo = mod("moe")
    for (n, e, top_k), dtype in product([(37, 6, 2), (37, 8, 1), (37, 5, 3)] + (not small) * [(4096, 64, 6)], DTYPES):
        def fn(n=n, e=e, top_k=top_k, dtype=dtype):
            # bf16 and many rows: distinct logits per row, so no (near) ties to break differently
            logits = (rand(n, e) if dtype == FP32 and n < 100 else
                      (torch.rand(n, e, device=DEV).argsort(1) * 0.25 - 1).to(dtype))
            (w, ex), (rw, rex) = mo.moe_route(logits, top_k), mo.moe_route_reference(logits, top_k)
            return [("experts", ex, rex, 0.0, 0.0), ("weights", w, rw, 1e-6, 1e-6)]
        yield "moe_route", f"N={n} E={e} top_k={top_k}", dtype, fn
    for counts, dtype in product([(10, 0, 25, 3, 17, 19)] + (not small) * [(1, 300, 0, 77, 512, 6, 33, 100)], DTYPES):
        def fn(counts=counts, dtype=dtype):
            x, w, offsets = rand(sum(counts), 45, dtype=dtype), rand(len(counts), 70, 45, dtype=dtype), cumsum0(counts).long()
            got, want = mo.moe_grouped_matmul(x, w, offsets), mo.moe_grouped_matmul_reference(x, w, offsets)
            return [("out", got, want, *GEMM_TOL[dtype])]
        yield "moe_grouped_matmul", f"rows per expert {list(counts)} N=70 K=45", dtype, fn


# ---- speed: the int8/int4 dequant-matmul vs cuBLAS bf16 and torch's int8 GEMMs ------------------

def bench_ms(fn) -> float:
    """Median ms: ``triton.testing.do_bench`` on CUDA (L2 flushed between runs), else wall clock."""
    if DEV.type != "cuda":
        times = [(time.perf_counter(), fn(), time.perf_counter()) for _ in range(4)][1:]
        return statistics.median(end - begin for begin, _, end in times) * 1e3
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))


def speed_row(row) -> None:
    ql, qt = mod("quantized_linear"), mod("_quantized_linear_triton")
    n, k, m = row["N"], row["K"], row["M"]
    w, x = rand(n, k, scale=0.02), rand(m, k, dtype=BF16)
    q8, s8 = ql.quantize_int8(w)
    packs = {"int8_triton": (q8, s8, None), "int4_g32_triton": ql.quantize_int4(w, 32)}
    if k % 128 == 0:  # SmolLM2's K=576 takes groups of 32 and 64 only
        packs["int4_g128_triton"] = ql.quantize_int4(w, 128)
    deq = {kind: ql.dequantize_int8(q8, s8, BF16) if p[2] is None else ql.dequantize_int4(*p, BF16)
           for kind, p in packs.items()}
    pad = 32 if m <= 16 else m  # torch._int_mm on CUDA needs more than 16 rows: zero rows added
    xp = torch.cat([x, x.new_zeros(pad - m, k)])
    xq = ql.quantize_rows_reference(xp)[0]

    def w8a8():  # as quantized_linear's W8A8 reference: rows to int8, int32 GEMM, both scales
        xq, xs = ql.quantize_rows_reference(xp)
        return (torch._int_mm(xq, q8.t()) * (xs[:, None] * s8[None, :])).to(BF16)
    calls = {"bf16_cublas": (lambda: x @ deq["int8_triton"].t(), 2 * n * k)}  # first: the base
    calls.update({kind: (lambda p=p: qt.matmul(x, *p, None), sum(t.numel() * t.element_size() for t in p
                                                                 if t is not None)) for kind, p in packs.items()})
    calls.update({"int_mm": (lambda: torch._int_mm(xq, q8.t()), n * k), "w8a8_int_mm_rowscale": (w8a8, n * k + 4 * n),
                  "weight_int8pack_mm": (lambda: torch._weight_int8pack_mm(x, q8, s8.to(BF16)), n * k + 2 * n)})
    for kind, (call, nbytes) in calls.items():
        try:
            with torch.inference_mode():
                out, ms = call(), bench_ms(call)
            stats = {"ms": round(ms, 5), "tflops": round(2 * m * n * k / ms / 1e9, 3),
                     "weight_gbps": round(nbytes / ms / 1e6, 1),
                     "vs_bf16": round(row.get("bf16_cublas", {}).get("ms", ms) / ms, 3)}
            if kind in deq:  # against an fp32 GEMM on the same de-quantized weight
                ref = x.float() @ deq[kind].float().t()
                stats["rel_err"] = float((out.float() - ref).abs().max() / ref.abs().max())
            if kind in ("int_mm", "w8a8_int_mm_rowscale") and pad > m:
                stats["note"] = f"M padded {m} -> {pad} with zero rows: torch._int_mm on CUDA needs M > 16"
        except Exception as e:  # noqa: BLE001
            stats = {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"}
        row[kind] = stats


def speed(small: bool, deadline: float) -> None:
    shapes = [(64, 128, "tiny")] if small else [(576, 576, "SmolLM2-135M q/o"), (1536, 576, "SmolLM2-135M up"),
                                                (4096, 4096, "Llama-7B q/o"), (11008, 4096, "Llama-7B up")]
    for (n, k, model), m in product(shapes, (3,) if small else (1, 16, 256, 4096)):
        RESULTS["speed"].append(row := {"N": n, "K": k, "M": m, "model": model})
        if time.monotonic() > deadline:
            row["skipped"] = "time budget spent"
            continue
        try:
            torch.manual_seed(0)
            speed_row(row)
        except Exception as e:  # noqa: BLE001
            row.update(error=f"{type(e).__name__}: {e}"[:500], traceback=tail(e))
        print(f"speed {n}x{k} M={m}: " + ", ".join(f"{kind} {s.get('ms', 'error')}" for kind, s in row.items()
                                                   if isinstance(s, dict)), flush=True)


# ---- main ---------------------------------------------------------------------------------------

def table() -> str:
    lines, by = ["", "== correctness: passed/cases, skipped, worst max abs error =="], {}
    for r in RESULTS["correctness"]:
        by.setdefault(r["section"], []).append(r)
    lines += [f"{section:28s} {sum(r['passed'] is True for r in rows):3d}/{len(rows):<3d} "
              f"{sum(r['passed'] is None for r in rows)}  {max(r.get('max_abs_err', 0) for r in rows):.2e}"
              for section, rows in by.items()]
    lines += [f"  FAIL {r['section']} | {r['case']} | {r['dtype']}: {r.get('error') or r.get('errors')}"
              for r in RESULTS["correctness"] if r["passed"] is False]
    kinds = ("bf16_cublas", "int8_triton", "int4_g32_triton", "int4_g128_triton", "int_mm",
             "w8a8_int_mm_rowscale", "weight_int8pack_mm")
    lines += ["", "== speed: median ms (x vs bf16 cuBLAS, weight GB/s) ==",
              f"{'N x K':>11s} {'M':>5s} " + " ".join(f"{k[:21]:>21s}" for k in kinds)]
    for row in RESULTS["speed"]:
        cells = [f"{s['ms']:.4f} ({s['vs_bf16']:.2f}x {s['weight_gbps']:.0f})" if "ms" in s else
                 "error" if "error" in s else row.get("skipped", "error" if "error" in row else "-")[:21]
                 for s in (row.get(kind, {}) for kind in kinds)]
        lines.append(f"{row['N']:>5d}x{row['K']:<5d} {row['M']:>5d} " + " ".join(f"{c:>21s}" for c in cells))
    errors = {f"{kind}: {s['error']}" for row in RESULTS["speed"] for kind, s in [("row", row), *row.items()]
              if isinstance(s, dict) and "error" in s}
    return "\n".join(lines + [f"  {e}" for e in sorted(errors)])


def save(path: str) -> None:
    with open(path, "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--smoke", action="store_true", help="small shapes, one timing shape")
    parser.add_argument("--out", default="gpu_kernels_check.json")
    parser.add_argument("--time-budget", type=float, default=210.0,
                        help="seconds; correctness cases stop starting at 70%% of it, timing shapes at 100%%")
    args = parser.parse_args()
    start, meta = time.monotonic(), RESULTS["meta"]
    meta.update(torch=torch.__version__, cuda=torch.version.cuda, device=args.device, smoke=args.smoke,
                MLX_KERNELS=os.environ["MLX_KERNELS"], TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET"))
    try:
        import triton

        meta["triton"] = triton.__version__
        if args.device == "cuda":
            meta.update(gpu=torch.cuda.get_device_name(), capability=torch.cuda.get_device_capability())
            torch.set_float32_matmul_precision("highest")  # exact fp32 references: no TF32
        meta["backend"] = mod("dispatch").backend_for(DEV)
    except Exception as e:  # noqa: BLE001
        meta.update(error=f"{type(e).__name__}: {e}", traceback=tail(e))
        print("setup failed:", meta["error"], flush=True)
    makers = (quantized_cases, nf4_cases, elementwise_cases, lora_cases, loss_cases, attention_cases, moe_cases)
    done = set()  # the small cases of every op first, then the larger ones: all ops get checked in time
    for small, make in product((True,) if args.smoke else (True, False), makers) if "error" not in meta else ():
        try:
            for section, name, dtype, fn in make(small):
                if (section, name, dtype) not in done:
                    done.add((section, name, dtype))
                    run_case(section, name, dtype, fn, start + 0.7 * args.time_budget)
        except Exception as e:  # noqa: BLE001 - a module that does not import, say: recorded once
            if make not in done:
                done.add(make)
                RESULTS["correctness"].append({"section": make.__name__, "case": "making the cases", "dtype": "-",
                                               "passed": False, "error": f"{type(e).__name__}: {e}"[:500],
                                               "traceback": tail(e)})
                print(f"FAIL {make.__name__}: {type(e).__name__}: {e}", flush=True)
        save(args.out)
    if "error" not in meta:
        meta["correctness_s"] = round(time.monotonic() - start, 1)
        speed(args.smoke, start + args.time_budget)
        meta["total_s"] = round(time.monotonic() - start, 1)
    passed = [r["passed"] for r in RESULTS["correctness"]]
    RESULTS["summary"] = summary = {"cases": len(passed), "passed": passed.count(True),
                                    "failed": passed.count(False), "skipped": passed.count(None)}
    save(args.out)
    print(table(), f"\n\n{summary}  JSON: {args.out}")
    return 1 if summary["failed"] or "error" in meta else 0


if __name__ == "__main__":
    sys.exit(main())
