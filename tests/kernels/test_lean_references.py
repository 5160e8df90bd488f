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
