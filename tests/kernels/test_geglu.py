import pytest
import torch
import torch.nn.functional as F
from transformers.activations import NewGELUActivation

from mlx_kernels import geglu, gelu_tanh
from mlx_kernels.geglu import geglu_reference

from .conftest import DTYPES, assert_close, grads_of


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(6, 42, 123), (431,)])
@pytest.mark.parametrize("dtype_tol", DTYPES)
def test_triton_matches_reference_forward_and_backward(shape, dtype_tol, triton_backend):
    dtype, atol, rtol = dtype_tol
    torch.manual_seed(0)
    g, u, dy = (torch.randn(shape, dtype=dtype) for _ in range(3))
    for fn, ref, inputs in [(gelu_tanh, lambda a: geglu_reference(a, None), (g,)),
                            (geglu, geglu_reference, (g, u))]:
        got, got_grads = grads_of(fn, inputs, dy)
        want, want_grads = grads_of(ref, inputs, dy)
        assert_close(got, want, atol, rtol)
        for a, b in zip(got_grads, want_grads, strict=True):
            assert_close(a, b, atol, rtol)


def test_reference_equals_gpt2_gelu_new():
    x = torch.randn(1000) * 4
    torch.testing.assert_close(gelu_tanh(x), NewGELUActivation()(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(geglu(x, x), F.gelu(x, approximate="tanh") * x)
