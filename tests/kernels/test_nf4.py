import pytest
import torch

from mlx_kernels import nf4_dequantize, nf4_matmul, nf4_quantize
from mlx_kernels.nf4 import NF4_CODEBOOK, nf4_absmax, nf4_dequantize_reference


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


def test_bad_size_is_named():
    with pytest.raises(ValueError, match="multiple of 64"):
        nf4_quantize(torch.randn(3, 5))
