import pytest
import torch
import torch.nn.functional as F

from mlx_kernels import lora_linear, lora_linear_multi
from mlx_kernels.lora import lora_linear_multi_reference

from .conftest import assert_close, grads_of


def _plain(x, w, a, b, s, bias):
    return x @ w.T + bias + s * (x @ a.T) @ b.T


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(3, 7, 45), (33, 64)])
def test_triton_matches_plain_torch_forward_and_backward(shape, triton_backend):
    torch.manual_seed(0)
    inputs = (torch.randn(shape), torch.randn(70, shape[-1]), torch.randn(6, shape[-1]),
              torch.randn(70, 6), torch.randn(70))
    dy = torch.randn(*shape[:-1], 70)
    got, got_grads = grads_of(lambda x, w, a, b, bias: lora_linear(x, w, a, b, 0.5, bias), inputs, dy)
    want, want_grads = grads_of(lambda x, w, a, b, bias: _plain(x, w, a, b, 0.5, bias), inputs, dy)
    # fp32 sums of 45-64 products of O(1) values, accumulated in another order
    assert_close(got, want, 1e-4, 1e-5)
    for g, r in zip(got_grads, want_grads, strict=True):
        assert_close(g, r, 1e-4, 1e-5)


@pytest.mark.triton
def test_triton_multi_adapter_matches_reference(triton_backend):
    torch.manual_seed(0)
    x, w, bias = torch.randn(9, 45), torch.randn(70, 45), torch.randn(70)
    a, b = torch.randn(3, 6, 45), torch.randn(3, 70, 6)
    ids = torch.tensor([0, 2, -1, 1, 1, 0, -1, 2, 2])
    scalings = torch.tensor([0.5, 1.0, 2.0])
    got = lora_linear_multi(x, w, a, b, ids, scalings, bias)
    want = lora_linear_multi_reference(x, w, a, b, ids, scalings, bias)
    assert_close(got, want, 1e-4, 1e-5)


def test_multi_reference_equals_one_adapter_per_row():
    torch.manual_seed(0)
    x, w = torch.randn(5, 12), torch.randn(8, 12)
    a, b = torch.randn(2, 3, 12), torch.randn(2, 8, 3)
    ids = torch.tensor([1, -1, 0, 1, 0])
    got = lora_linear_multi_reference(x, w, a, b, ids, torch.tensor([2.0, 0.5]))
    for row, adapter in enumerate(ids.tolist()):
        want = F.linear(x[row], w)
        if adapter >= 0:
            want = want + [2.0, 0.5][adapter] * (x[row] @ a[adapter].T) @ b[adapter].T
        torch.testing.assert_close(got[row], want)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="lora_a"):
        lora_linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(2, 5), torch.randn(3, 2), 1.0)
