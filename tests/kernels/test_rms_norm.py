import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from mlx_kernels import rms_norm
from mlx_kernels.rms_norm import rms_norm_reference

from .conftest import DTYPES, assert_close, grads_of


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(6, 7, 123), (1, 5), (300, 64)])
@pytest.mark.parametrize("dtype_tol", DTYPES)
def test_triton_matches_reference_forward_and_backward(shape, dtype_tol, triton_backend):
    dtype, atol, rtol = dtype_tol
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype)
    w = torch.randn(shape[-1], dtype=dtype)
    dy = torch.randn(shape, dtype=dtype)
    got, got_grads = grads_of(lambda a, b: rms_norm(a, b, 1e-6), (x, w), dy)
    want, want_grads = grads_of(lambda a, b: rms_norm_reference(a, b, 1e-6), (x, w), dy)
    assert_close(got, want, atol, rtol)
    for g, r in zip(got_grads, want_grads, strict=True):
        # dW sums over rows: its error grows with the row count in bf16.
        assert_close(g, r, atol * (10 if dtype == torch.bfloat16 else 1), rtol)


def test_reference_equals_hf_llama_rmsnorm():
    torch.manual_seed(0)
    hf = LlamaRMSNorm(123, eps=1e-5)
    hf.weight.data = torch.randn(123)
    x = torch.randn(4, 9, 123)
    assert torch.equal(rms_norm_reference(x, hf.weight, 1e-5), hf(x))
