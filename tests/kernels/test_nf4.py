import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mlx_kernels import nf4_dequantize, nf4_matmul, nf4_quantize
from mlx_kernels.nf4 import NF4_CODEBOOK, nf4_absmax, nf4_dequantize_reference

from .conftest import DTYPES, assert_close


def _weight():
    torch.manual_seed(0)
    return torch.randn(300, 128)


def test_codebook_is_qlora_nf4():
    assert len(NF4_CODEBOOK) == 16 and NF4_CODEBOOK[0] == -1.0 and NF4_CODEBOOK[-1] == 1.0
    assert NF4_CODEBOOK[7] == 0.0 and sorted(NF4_CODEBOOK) == list(NF4_CODEBOOK)


def test_round_trip_error_within_the_format_bound():
    w = _weight()
    q = nf4_quantize(w)
    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(1)
    codebook = torch.tensor(NF4_CODEBOOK)
    half_gap = ((codebook[1:] - codebook[:-1]) / 2).max()
    # a value is off by at most half a codebook gap of its block's scale, plus the error of the
    # 8-bit absmax (codes are at most 1 in magnitude)
    bound = half_gap * absmax + (nf4_absmax(q) - absmax).abs()
    err = (nf4_dequantize_reference(q).reshape(-1, 64) - blocks).abs().amax(1)
    assert (err <= bound + 1e-6).all()
    assert ((nf4_absmax(q) - absmax).abs() / absmax).max() < 0.01


def test_memory_is_half_a_byte_per_parameter_plus_overhead():
    w = _weight()
    q = nf4_quantize(w)
    blocks = w.numel() // 64
    assert q.nbytes() == w.numel() // 2 + blocks + 4 * -(-blocks // 256) + 4


@pytest.mark.triton
def test_triton_dequantize_is_exact(triton_backend):
    q = nf4_quantize(_weight())
    assert torch.equal(nf4_dequantize(q), nf4_dequantize_reference(q))


def test_matmul_uses_the_dequantized_weight():
    q = nf4_quantize(_weight())
    x = torch.randn(5, 128, requires_grad=True)
    y = nf4_matmul(x, q)
    torch.testing.assert_close(y, x @ nf4_dequantize_reference(q).T)
    y.sum().backward()
    assert x.grad is not None


# (x shape, weight [out, in]): 96 and 100 are not multiples of the 64-value block, so blocks
# straddle rows; 300 x 128 has 600 blocks, so three double-quantization groups of 256
NF4_SHAPES = [((3, 5, 96), (70, 96)), ((17, 100), (48, 100)), ((4, 128), (300, 128))]


@pytest.mark.triton
@pytest.mark.parametrize("dtype_tol", DTYPES)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("shape", NF4_SHAPES, ids=str)
def test_fused_matmul_matches_dequantize_then_linear(shape, bias, dtype_tol, triton_backend):
    dtype, atol, rtol = dtype_tol
    (x_shape, w_shape), k = shape, shape[1][1]
    torch.manual_seed(0)
    q = nf4_quantize((torch.randn(w_shape) / k**0.5).to(dtype))
    x = torch.randn(x_shape, dtype=dtype)
    b = torch.randn(w_shape[0], dtype=dtype) if bias else None
    dy = torch.randn(*x_shape[:-1], w_shape[0], dtype=dtype)

    def run(fn):
        xs = x.clone().requires_grad_(True)
        bs = None if b is None else b.clone().requires_grad_(True)
        y = fn(xs, bs)
        y.backward(dy)
        return y.detach(), xs.grad, None if bs is None else bs.grad

    got = run(lambda xs, bs: nf4_matmul(xs, q, bs))
    want = run(lambda xs, bs: F.linear(xs, nf4_dequantize_reference(q).to(dtype), bs))
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None
        else:
            assert_close(g, w, atol, rtol)


class _NewStorages(TorchDispatchMode):
    """Bytes of every tensor storage that torch allocates while active.

    Every CPU allocation torch makes goes through an aten op (``empty`` included), and a dispatch
    mode sees each op's outputs; an output whose storage no input holds is new memory. The sum
    is an upper bound on how far the peak rises. ``set_`` is skipped: the interpreter uses it to
    re-wrap the kernel arguments' own storages, which allocates nothing."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        held = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is not torch.ops.aten.set_:
            self.sizes += [t.untyped_storage().nbytes() for t in tree_leaves(out)
                           if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in held]
        return out


@pytest.mark.triton
def test_fused_matmul_never_materialises_the_weight(triton_backend):
    torch.manual_seed(0)
    q = nf4_quantize(torch.randn(128, 512) / 512**0.5)
    weight_bytes = 128 * 512 * 4
    x = torch.randn(2, 512, requires_grad=True)  # few rows: outputs far smaller than the weight
    with _NewStorages() as fused:
        nf4_matmul(x, q).sum().backward()
    with _NewStorages() as unfused:  # the instrument does see a de-quantized weight
        F.linear(x, nf4_dequantize(q)).sum().backward()
    assert max(unfused.sizes) >= weight_bytes
    # forward and backward together allocate y, dy and dx: a few KiB, not the 256 KiB weight
    assert sum(fused.sizes) < weight_bytes / 8


def test_bad_size_is_named():
    with pytest.raises(ValueError, match="multiple of 64"):
        nf4_quantize(torch.randn(3, 5))
