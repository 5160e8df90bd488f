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


def _native_library():
    from mlx_kernels import _cpu_native

    if _cpu_native.library() is None:
        pytest.fail("the native CPU kernels did not build here (a C compiler is needed)")


@pytest.mark.parametrize("shape", [(7,), (3, 1536), (64, 1536), (40, 1000)])  # odd, 1 or 2 threads
def test_native_cpu_inference_forward_equals_silu_times_up(shape):
    """fp32 CPU inference runs the C loop (one pass): within 5e-7 relative of float64
    silu(g) * u, 0 where g < -87, inf and nan carried as torch carries them."""
    _native_library()
    torch.manual_seed(1)
    g, u = torch.randn(shape) * 8, torch.randn(shape)
    flat = g.view(-1)
    flat[:7] = torch.tensor([0.0, 30.0, -30.0, 88.0, -88.0, float("inf"), float("nan")])[:flat.numel()]
    with torch.inference_mode():
        got = swiglu(g, u)
    want = F.silu(g.double()) * u.double()
    finite = torch.isfinite(want)
    error = (got.double() - want).abs()[finite]
    assert (error <= 5e-7 * want.abs()[finite] + 1.5e-36 * u.double().abs()[finite]).all()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    infinite = torch.isinf(want)  # g = inf
    assert infinite.any() and torch.equal(got[infinite], (F.silu(g) * u)[infinite])


def test_native_forward_only_for_contiguous_fp32_cpu_inference(monkeypatch):
    import importlib

    module = importlib.import_module("mlx_kernels.swiglu")  # the attribute is the op
    _native_library()
    ran, rows = [], []
    monkeypatch.setattr(module, "_swiglu_native", lambda g, u: ran.append(1) or F.silu(g) * u)
    monkeypatch.setattr(module, "_swiglu_native_rows",
                        lambda g, u, ld: rows.append(ld) or F.silu(g) * u)
    g, u = torch.randn(4, 6), torch.randn(4, 6)
    with torch.no_grad():  # no graph, but maybe a recomputed activation: torch's ops, bit-exact
        swiglu(g, u)
    with torch.inference_mode():
        swiglu(g, u)
        swiglu(g.t(), u.t())  # a dense transposed layout, as linear(contiguous=False) returns
        swiglu(g[:, ::2], u[:, ::2])  # gaps within rows: torch's ops
        swiglu(*torch.randn(4, 12).split(6, dim=-1))  # a fused gate/up output's halves: rows
        swiglu(torch.randn(4, 12)[:, :6], torch.randn(4, 8)[:, :6])  # rows apart unequally: torch
        swiglu(g.t(), u.t().contiguous())  # two layouts: torch's ops
        swiglu(g.double(), u.double())
        monkeypatch.setenv("MLX_KERNELS", "torch")
        swiglu(g, u)
        monkeypatch.delenv("MLX_KERNELS")
    trained = g.clone().requires_grad_()
    swiglu(trained, u).sum().backward()  # autograd: the Function
    assert ran == [1, 1] and rows == [12] and trained.grad is not None
    g, u = torch.randn(8, 96), torch.randn(8, 96)
    with torch.inference_mode():
        out = module._swiglu_native(g.t(), u.t())  # the real kernel on the transposed layout
    assert out.stride() == (1, 96)
    torch.testing.assert_close(out, F.silu(g.t()) * u.t(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", [(1, 5, 7), (64, 1536), (2, 33, 1000)])
def test_native_rows_of_a_fused_gate_up_output(shape):
    """The halves of one fused gate/up projection's output (rows 2 x cols apart) go through the
    C loop where they lie; the output is contiguous and equals silu(g) * u as the flat loop."""
    _native_library()
    torch.manual_seed(2)
    fused = torch.randn(*shape[:-1], 2 * shape[-1]) * 4
    g, u = fused.split(shape[-1], dim=-1)
    with torch.inference_mode():
        got = swiglu(g, u)
        flat = swiglu(g.contiguous(), u.contiguous())
    assert got.is_contiguous() and torch.equal(got, flat)
    torch.testing.assert_close(got, F.silu(g) * u, atol=1e-6, rtol=1e-6)
