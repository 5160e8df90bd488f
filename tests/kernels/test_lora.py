import pytest
import torch
import torch.nn.functional as F

from mlx_kernels import lora_linear, lora_linear_multi
from mlx_kernels.lora import lora_linear_multi_reference, lora_linear_reference

from .conftest import DTYPES, assert_close, grads_of


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


# (x shape, out, rank): batched and flat rows, sizes off powers of two, ranks 6..64
LORA_SHAPES = [((2, 7, 45), 70, 6), ((33, 64), 50, 16), ((3, 11), 37, 64)]
# which of x, W, A, B, bias get a gradient: everything; a LoRA layer (frozen base, so the kernel
# skips dW); the first layer of a model (no dx, but dA still needs dy B)
GRADS = {"all": (1, 1, 1, 1, 1), "lora": (1, 0, 1, 1, 0), "no_dx": (0, 0, 1, 1, 1)}


@pytest.mark.triton
@pytest.mark.parametrize("dtype_tol", DTYPES)
@pytest.mark.parametrize("grads", GRADS.values(), ids=GRADS.keys())
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=str)
def test_fused_backward_matches_reference_autograd(shape, grads, dtype_tol, triton_backend):
    dtype, atol, rtol = dtype_tol
    (x_shape, out, rank), k = shape, shape[0][-1]
    torch.manual_seed(0)
    # weights at their initialisation scale, so outputs and gradients are O(1) as in training
    inputs = [torch.randn(x_shape), torch.randn(out, k) / k**0.5, torch.randn(rank, k) / k**0.5,
              torch.randn(out, rank) / rank**0.5, torch.randn(out)]
    leaves = [t.to(dtype).requires_grad_(bool(g)) for t, g in zip(inputs, grads, strict=True)]
    dy = torch.randn(*x_shape[:-1], out, dtype=dtype)

    def run(fn):
        args = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
        y = fn(*args[:4], 0.5, args[4])
        y.backward(dy)
        return y.detach(), [t.grad for t in args]

    got, got_grads = run(lora_linear)
    want, want_grads = run(lora_linear_reference)
    assert_close(got, want, atol, rtol)
    for g, w, asked in zip(got_grads, want_grads, grads, strict=True):
        assert (g is None) == (w is None) == (not asked)
        if asked:
            assert_close(g, w, atol, rtol)


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


@pytest.mark.triton
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_add_lora_multi_to_any_base_output(layout, triton_backend):
    """The adapters added to a base layer's output (e.g. a quantized layer's, or the transposed
    view a zoo Linear may return) equal the fused op; the result is what to use."""
    from mlx_kernels import add_lora_multi

    torch.manual_seed(0)
    x, w = torch.randn(9, 45), torch.randn(70, 45)
    a, b = torch.randn(3, 6, 45), torch.randn(3, 70, 6)
    ids = torch.tensor([0, 2, -1, 1, 1, 0, -1, 2, 2])
    scalings = torch.tensor([0.5, 1.0, 2.0])
    base = F.linear(x, w) if layout == "contiguous" else (w @ x.t()).t()
    got = add_lora_multi(x, base, a, b, ids, scalings)
    assert_close(got, lora_linear_multi_reference(x, w, a, b, ids, scalings), 1e-4, 1e-5)


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


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_under_autocast_it_computes_as_autocast_does_for_linear(backend, monkeypatch):
    """Training under ``torch.autocast`` (bf16 mixed precision): every operand in the autocast
    dtype, fp32 gradients for fp32 leaves, as torch's own autocast gives the plain composition."""
    monkeypatch.setenv("MLX_KERNELS", backend)
    torch.manual_seed(0)
    k, out, rank = 48, 40, 8
    inputs = (torch.randn(2, 5, k), torch.randn(out, k) / k**0.5, torch.randn(rank, k) / k**0.5,
              torch.randn(out, rank) / rank**0.5, torch.randn(out))
    dy = torch.randn(2, 5, out)

    def plain(x, w, a, b, bias):
        return F.linear(x, w, bias) + 0.5 * F.linear(F.linear(x, a), b)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_grads = grads_of(lambda x, w, a, b, bias: lora_linear(x, w, a, b, 0.5, bias),
                                  inputs, dy)
        want, want_grads = grads_of(plain, inputs, dy)
    assert got.dtype == want.dtype == torch.bfloat16
    assert_close(got, want, 2e-2, 2e-2)  # bf16 operands; the sums accumulate in another order
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.dtype == w.dtype == torch.float32
        assert_close(g, w, 2e-2, 2e-2)
