import pytest
import torch

# (dtype, atol, rtol): fp32 is exact up to summation order; bf16 has 8 mantissa bits, so one
# rounding of an O(1) value is ~4e-3 and the kernels round at the same points as the references.
DTYPES = [
    pytest.param((torch.float32, 1e-5, 1e-5), id="fp32"),
    pytest.param((torch.bfloat16, 2e-2, 2e-2), id="bf16"),
]


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton kernels (run by the interpreter on CPU; the root conftest sets it)."""
    monkeypatch.setenv("MLX_KERNELS", "triton")


def assert_close(got, want, atol, rtol):
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


def grads_of(fn, inputs, grad_out):
    """Output and input gradients of ``fn(*inputs)`` for a given output gradient."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]
