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


@pytest.mark.parametrize("shape", [(1, 576), (7, 130), (3, 5, 64), (2048, 576)])
def test_native_cpu_inference_forward_equals_the_reference(shape):
    """fp32 CPU inference runs the C loop (one pass; the sum of squares in another order than
    torch's: within 1e-6 relative); autograd and plain no_grad keep the torch path."""
    from mlx_kernels import _cpu_native
    from mlx_kernels.rms_norm import rms_norm_reference

    if _cpu_native.library() is None:
        pytest.fail("the native CPU kernels did not build here (a C compiler is needed)")
    torch.manual_seed(0)
    x, w = torch.randn(shape) * 3, torch.rand(shape[-1])
    with torch.inference_mode():
        got = rms_norm(x, w, 1e-5)
    torch.testing.assert_close(got, rms_norm_reference(x, w, 1e-5), atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # the recompute path's forward: torch's own, bit for bit
        assert torch.equal(rms_norm(x, w, 1e-5),
                           torch.nn.functional.rms_norm(x, (shape[-1],), w, 1e-5))
