import pytest
import torch
import torch.nn.functional as F

from mlx_kernels import swiglu

from .conftest import DTYPES, assert_close, grads_of


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(6, 42, 123), (431,), (3, 1024)])
@pytest.mark.parametrize("dtype_tol", DTYPES)
def test_triton_matches_plain_torch_forward_and_backward(shape, dtype_tol, triton_backend):
    dtype, atol, rtol = dtype_tol
    torch.manual_seed(0)
    g, u, dy = (torch.randn(shape, dtype=dtype) for _ in range(3))
    got, got_grads = grads_of(swiglu, (g, u), dy)
    want, want_grads = grads_of(lambda a, b: F.silu(a) * b, (g, u), dy)
    assert_close(got, want, atol, rtol)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert_close(a, b, atol, rtol)


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="differ"):
        swiglu(torch.randn(2, 3), torch.randn(3, 2))
