"""On CPU the ops run their references through lean autograd Functions (fewer saved tensors):
same forward values as the plain references, gradients equal to autograd's on them."""

import pytest
import torch
import torch.nn.functional as F

from mlx_kernels import lora_linear, rms_norm, rope, swiglu
from mlx_kernels.lora import lora_linear_reference
from mlx_kernels.rms_norm import rms_norm_reference
from mlx_kernels.rope import rope_reference

from .conftest import DTYPES, assert_close, grads_of


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("MLX_KERNELS", "torch")


@pytest.mark.parametrize("dtype_tol", DTYPES)
def test_lean_functions_match_autograd_on_the_references(dtype_tol, torch_backend):
    dtype, atol, rtol = dtype_tol
    torch.manual_seed(0)
    x, w = torch.randn(6, 7, 123, dtype=dtype), torch.randn(123, dtype=dtype)
    q, cos, sin = torch.randn(2, 3, 7, 24, dtype=dtype), torch.randn(2, 7, 24, dtype=dtype), torch.randn(2, 7, 24, dtype=dtype)
    g, u = torch.randn(5, 431, dtype=dtype), torch.randn(5, 431, dtype=dtype)
    h, weight, bias = torch.randn(2, 9, 67, dtype=dtype), torch.randn(45, 67, dtype=dtype), torch.randn(45, dtype=dtype)
    lora_a, lora_b = torch.randn(5, 67, dtype=dtype), torch.randn(45, 5, dtype=dtype)
    cases = [
        (lambda a, b: rms_norm(a, b, 1e-6), lambda a, b: rms_norm_reference(a, b, 1e-6), (x, w)),
        (lambda a: rope(a, cos, sin), lambda a: rope_reference(a, cos, sin), (q,)),
        (swiglu, lambda a, b: F.silu(a) * b, (g, u)),
        (lambda *t: lora_linear(*t[:4], 0.5, t[4]), lambda *t: lora_linear_reference(*t[:4], 0.5, t[4]),
         (h, weight, lora_a, lora_b, bias)),
    ]
    for lean, plain, inputs in cases:
        dy = torch.randn_like(plain(*inputs))
        got, got_grads = grads_of(lean, inputs, dy)
        want, want_grads = grads_of(plain, inputs, dy)
        assert torch.equal(got, want)  # the forward is the reference's own arithmetic
        for a, b in zip(got_grads, want_grads, strict=True):
            # dW sums over 42 rows: its rounding grows with them in bf16
            assert_close(a, b, atol * (10 if dtype == torch.bfloat16 else 1), rtol)


@pytest.mark.parametrize("dtype_tol", DTYPES)
@pytest.mark.parametrize("no_graph", ["no_grad", "inference_mode", "no_requires_grad"])
def test_inference_skips_the_functions_with_the_references_values(dtype_tol, no_graph, monkeypatch):
    """Where no graph is recorded the ops run their math without the autograd Functions (whose
    Python bookkeeping costs more than a small inference op): the references' values."""
    from mlx_kernels.rms_norm import RMSNormTorchFunction
    from mlx_kernels.rope import RoPETorchFunction
    from mlx_kernels.swiglu import SwiGLUTorchFunction

    for function in (RMSNormTorchFunction, RoPETorchFunction, SwiGLUTorchFunction):
        monkeypatch.setattr(function, "apply", staticmethod(lambda *a: pytest.fail("took the Function")))
    dtype, atol, rtol = dtype_tol
    torch.manual_seed(1)
    x, w = torch.randn(3, 24, 576, dtype=dtype) * 3, torch.randn(576, dtype=dtype)
    q = torch.randn(1, 24, 9, 64, dtype=dtype).transpose(1, 2)  # the model's strided layout
    cos, sin = torch.randn(1, 24, 64, dtype=dtype), torch.randn(1, 24, 64, dtype=dtype)
    g, u = torch.randn(24, 1536, dtype=dtype), torch.randn(24, 1536, dtype=dtype)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
               "no_requires_grad": torch.enable_grad}[no_graph]
    with context():
        # torch's fused rms_norm kernel for fp32 (held to the reference at fp32 rounding), the
        # reference's own arithmetic for the rest, but for fp32 swiglu in inference mode: the
        # native C loop (test_swiglu.py: within 5e-7 of float64; 1e-6 of torch's fp32 silu here)
        assert_close(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), 1e-6, 1e-6)
        assert torch.equal(rope(q, cos, sin), rope_reference(q, cos, sin))
        if dtype == torch.float32 and no_graph == "inference_mode":
            assert_close(swiglu(g, u), F.silu(g) * u, 1e-7, 1e-6)
            assert_close(swiglu(g.t(), u.t()), (F.silu(g) * u).t(), 1e-7, 1e-6)
        else:
            assert torch.equal(swiglu(g, u), F.silu(g) * u)
            assert torch.equal(swiglu(g.t(), u.t()), (F.silu(g) * u).t())  # any layout, same out
