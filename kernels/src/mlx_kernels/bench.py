"""``mlx bench kernels``: each op against plain torch (and ``torch.compile`` of it), per shape.

Times are the best of ``repeats`` runs after a warm-up (CUDA synchronised); peak memory is
``torch.cuda.max_memory_allocated`` on CUDA and, on CPU, the growth of the process's peak RSS
measured in a fresh subprocess per case (so one case's peak does not hide another's). On CPU the
ops run their torch references; on CUDA their Triton kernels. Results: a table and JSON.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import mlx_kernels as K


@dataclass
class Case:
    op: str
    shape: str
    make: Callable[[torch.device, bool], tuple]  # (device, quick) -> inputs
    ours: Callable
    plain: Callable  # the same math in plain torch


def _rand(device, *shape, grad=False, dtype=torch.float32, std=1.0):
    return (torch.randn(*shape, device=device, dtype=dtype) * std).requires_grad_(grad)


def _backward(fn):
    """Run ``fn`` then backprop a sum: benchmarks the op's forward + backward."""

    def run(*args):
        out = fn(*args)
        out.float().sum().backward()

    return run


def _paged_inputs(device, quick):
    batch, context, heads, kv_heads, dim, block = (4, 64, 4, 2, 32, 16) if quick else (16, 512, 9, 3, 64, 16)
    blocks_per_seq = context // block
    kc = _rand(device, batch * blocks_per_seq, block, kv_heads, dim)
    vc = _rand(device, batch * blocks_per_seq, block, kv_heads, dim)
    tables = torch.randperm(batch * blocks_per_seq, device=device).view(batch, -1).int()
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return _rand(device, batch, heads, dim), kc, vc, tables, lens


def _paged_plain(q, kc, vc, tables, lens):
    keys = kc[tables.long()].flatten(1, 2).transpose(1, 2)
    values = vc[tables.long()].flatten(1, 2).transpose(1, 2)
    return F.scaled_dot_product_attention(q[:, :, None], keys, values, enable_gqa=True)[:, :, 0]


def _varlen_inputs(device, quick):
    seqs, length, heads, kv_heads, dim = (2, 32, 4, 2, 32) if quick else (4, 256, 9, 3, 64)
    cu = torch.arange(0, (seqs + 1) * length, length, dtype=torch.int32, device=device)
    total = seqs * length
    return (_rand(device, total, heads, dim), _rand(device, total, kv_heads, dim),
            _rand(device, total, kv_heads, dim), cu)


def _varlen_plain(q, k, v, cu):
    seqs, length = cu.numel() - 1, int(cu[1])
    def split(t):
        return t.view(seqs, length, t.shape[1], t.shape[2]).transpose(1, 2)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True, enable_gqa=True)
    return out.transpose(1, 2).reshape(q.shape)


def _moe_inputs(device, quick):
    tokens, experts, hidden, out = (64, 4, 64, 96) if quick else (1024, 8, 576, 1536)
    offsets = torch.linspace(0, tokens, experts + 1, device=device).long()
    return _rand(device, tokens, hidden), _rand(device, experts, out, hidden), offsets


def _moe_plain(x, w, offsets):
    return torch.cat([x[offsets[e]:offsets[e + 1]] @ w[e].T for e in range(w.shape[0])])


def _sizes(quick, small, large):
    return small if quick else large


CASES = [
    Case("rms_norm", "fwd+bwd", lambda d, q: (_rand(d, *_sizes(q, (64, 123), (4096, 576)), grad=True),
                                              _rand(d, _sizes(q, 123, 576), grad=True)),
         _backward(lambda x, w: K.rms_norm(x, w, 1e-5)),
         _backward(lambda x, w: w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype))),
    Case("rope", "fwd+bwd", lambda d, q: (_rand(d, 1, *_sizes(q, (4, 32, 16), (9, 512, 64)), grad=True),
                                          _rand(d, 1, *_sizes(q, (32, 16), (512, 64))),
                                          _rand(d, 1, *_sizes(q, (32, 16), (512, 64)))),
         _backward(K.rope),
         _backward(lambda x, c, s: x * c[:, None] + torch.cat((-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]), -1) * s[:, None])),
    Case("swiglu", "fwd+bwd", lambda d, q: (_rand(d, *_sizes(q, (64, 96), (4096, 1536)), grad=True),
                                            _rand(d, *_sizes(q, (64, 96), (4096, 1536)), grad=True)),
         _backward(K.swiglu), _backward(lambda g, u: F.silu(g) * u)),
    Case("geglu", "fwd+bwd", lambda d, q: (_rand(d, *_sizes(q, (64, 96), (4096, 1536)), grad=True),
                                           _rand(d, *_sizes(q, (64, 96), (4096, 1536)), grad=True)),
         _backward(K.geglu), _backward(lambda g, u: F.gelu(g, approximate="tanh") * u)),
    Case("fused_linear_cross_entropy", "fwd+bwd",
         lambda d, q: (_rand(d, *_sizes(q, (256, 64), (2048, 576)), grad=True),
                       # an LM head's scale: logits of O(1), no denormal softmax tails
                       _rand(d, _sizes(q, 4096, 49152), _sizes(q, 64, 576), grad=True, std=0.02),
                       torch.randint(0, _sizes(q, 4096, 49152), (_sizes(q, 256, 2048),), device=d)),
         _backward(K.fused_linear_cross_entropy),
         _backward(lambda h, w, y: F.cross_entropy((h @ w.T).float(), y))),
    Case("paged_attention_decode", "decode", _paged_inputs, K.paged_attention_decode, _paged_plain),
    Case("varlen_attention", "prefill", _varlen_inputs,
         lambda q, k, v, cu: K.varlen_attention(q, k, v, cu, cu), _varlen_plain),
    Case("lora_linear", "fwd+bwd",
         lambda d, q: (_rand(d, *_sizes(q, (64, 64), (2048, 576)), grad=True),
                       _rand(d, *_sizes(q, (96, 64), (1536, 576))),
                       _rand(d, 16, _sizes(q, 64, 576), grad=True),
                       _rand(d, _sizes(q, 96, 1536), 16, grad=True)),
         _backward(lambda x, w, a, b: K.lora_linear(x, w, a, b, 2.0)),
         _backward(lambda x, w, a, b: x @ w.T + 2.0 * (x @ a.T) @ b.T)),
    Case("nf4_matmul", "fwd",
         lambda d, q: (_rand(d, _sizes(q, 16, 256), _sizes(q, 64, 576)),
                       K.nf4_quantize(_rand(d, _sizes(q, 96, 1536), _sizes(q, 64, 576)))),
         K.nf4_matmul, lambda x, nf4: x @ K.nf4.nf4_dequantize_reference(nf4).T),
    # QLoRA training: dx through the frozen 4-bit weight, de-quantized again tile by tile
    Case("nf4_matmul", "fwd+bwd",
         lambda d, q: (_rand(d, _sizes(q, 16, 256), _sizes(q, 64, 576), grad=True),
                       K.nf4_quantize(_rand(d, _sizes(q, 96, 1536), _sizes(q, 64, 576)))),
         _backward(K.nf4_matmul), _backward(lambda x, nf4: x @ K.nf4.nf4_dequantize_reference(nf4).T)),
    Case("moe_grouped_matmul", "fwd", _moe_inputs, K.moe_grouped_matmul, _moe_plain),
]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time_ms(fn, args, device, repeats: int) -> float:
    fn(*args)  # warm-up (and compilation)
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def _impl(case: Case, name: str) -> Callable:
    if name == "mlx":
        return case.ours
    if name == "torch":
        return case.plain
    return torch.compile(case.plain)


def peak_mib(case: Case, impl: str, device, quick: bool) -> float:
    """Peak memory of one run of ``impl`` on ``case`` beyond its inputs."""
    if device.type == "cuda":
        args = case.make(device, quick)
        fn = _impl(case, impl)
        fn(*args)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(*args)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    done = subprocess.run([sys.executable, "-m", "mlx_kernels.bench", "--peak", case.op, case.shape,
                           impl, str(int(quick))], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"measuring the peak memory of {case.op}/{impl} failed:\n{done.stderr}")
    return float(done.stdout.strip().splitlines()[-1])


def rss_peak_growth_mib(fn, *args) -> float:
    """How far the process's resident memory peaks above its current level while ``fn`` runs.

    Linux only: resets the high-water mark (``/proc/self/clear_refs``), then reads ``VmHWM``.
    ``ru_maxrss`` would not do: it keeps the parent's peak across fork and exec.
    """
    def status_kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"/proc/self/status has no {field}")

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = status_kib("VmRSS")
    fn(*args)
    return (status_kib("VmHWM") - start) / 1024


def _peak_rss_child(op: str, shape: str, impl: str, quick: bool) -> float:
    case = next(c for c in CASES if (c.op, c.shape) == (op, shape))  # an op may have several passes
    fn = _impl(case, impl)
    fn(*case.make(torch.device("cpu"), True))  # warm-up: library pages are not the op's
    return rss_peak_growth_mib(fn, *case.make(torch.device("cpu"), quick))


def run(ops: list[str] | None = None, *, repeats: int = 5, quick: bool = False,
        compile: bool = False, memory: bool = True, device: str | None = None) -> list[dict]:
    """Benchmark the chosen ops (default all); returns one row per (op, implementation)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    known = [c.op for c in CASES]
    unknown = sorted(set(ops or []) - set(known))
    if unknown:
        raise ValueError(f"unknown ops {unknown}; known: {', '.join(known)}")
    impls = ["mlx", "torch"] + (["torch.compile"] if compile else [])
    rows = []
    for case in CASES:
        if ops and case.op not in ops:
            continue
        args = case.make(device, quick)
        times = {impl: best_time_ms(_impl(case, impl), args, device, repeats) for impl in impls}
        for impl in impls:
            row = {"op": case.op, "pass": case.shape, "device": device.type,
                   "backend": K.backend_for(device) if impl == "mlx" else impl, "impl": impl,
                   "time_ms": round(times[impl], 4),
                   "speedup_vs_torch": round(times["torch"] / times[impl], 3)}
            if memory:
                row["peak_mib"] = round(peak_mib(case, impl, device, quick), 1)
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    columns = ["op", "pass", "impl", "backend", "time_ms", "speedup_vs_torch"]
    if rows and "peak_mib" in rows[0]:
        columns.append("peak_mib")
    table = Table(*columns, title=f"mlx bench kernels ({rows[0]['device'] if rows else '-'})")
    for row in rows:
        table.add_row(*(str(row[c]) for c in columns))
    Console().print(table)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--peak":
        print(_peak_rss_child(sys.argv[2], sys.argv[3], sys.argv[4], bool(int(sys.argv[5]))))
    else:
        print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
