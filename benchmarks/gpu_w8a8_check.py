"""W8A8 on a CUDA device: ``quantized_linear.w8a8_linear`` (torch._int_mm) against its exact
reference, and its time against bf16 cuBLAS on the de-quantized weight. On a CUDA machine:

    PYTHONPATH=kernels/src python3 benchmarks/gpu_w8a8_check.py
"""

import torch
from triton.testing import do_bench

from mlx_kernels import quantized_linear as ql

torch.manual_seed(0)
failures = 0
for m, n, k in [(1, 96, 64), (5, 200, 136), (17, 576, 576), (300, 1536, 576)]:
    w, x, b = torch.randn(n, k, device="cuda") * 0.05, torch.randn(m, k, device="cuda"), torch.randn(n, device="cuda")
    q, s = ql.quantize_int8(w)
    with torch.inference_mode():
        got = ql.w8a8_linear(x, q, s, b)
        want = ql.w8a8_linear_reference(x, q, s, b)
    err = ((got - want).abs().max() / want.abs().max()).item()
    failures += err > 1e-5
    print(f"W8A8 M={m} N={n} K={k}: max rel err {err:.2e} {'ok' if err <= 1e-5 else 'FAIL'}")
print(f"{'N x K':>11s} {'M':>5s} {'bf16 ms':>9s} {'w8a8 ms':>9s} {'ratio':>6s}")
for (n, k), m in [((n, k), m) for n, k in [(4096, 4096), (11008, 4096)] for m in (1, 16, 256, 4096)]:
    w, x = torch.randn(n, k, device="cuda") * 0.02, torch.randn(m, k, device="cuda")
    q, s = ql.quantize_int8(w)
    wb, xb = ql.dequantize_int8(q, s, torch.bfloat16), x.bfloat16()
    with torch.inference_mode():
        bf16 = do_bench(lambda xb=xb, wb=wb: xb @ wb.t(), return_mode="median")
        w8a8 = do_bench(lambda x=x, q=q, s=s: ql.w8a8_linear(x, q, s), return_mode="median")
    print(f"{n:>5d}x{k:<5d} {m:>5d} {bf16:9.4f} {w8a8:9.4f} {bf16 / w8a8:5.2f}x")
raise SystemExit(1 if failures else 0)
