import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from mlx_kernels import rope
from mlx_kernels.rope import rope_reference

from .conftest import DTYPES, assert_close, grads_of


def _cos_sin(b, t, d, dtype):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    pos = torch.arange(t).float()[None, :, None].expand(b, t, 1) + torch.arange(b)[:, None, None]
    emb = torch.cat([pos * inv_freq, pos * inv_freq], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(2, 3, 7, 24), (1, 5, 3, 16), (3, 1, 11, 6)])
@pytest.mark.parametrize("dtype_tol", DTYPES)
def test_triton_matches_reference_forward_and_backward(shape, dtype_tol, triton_backend):
    dtype, atol, rtol = dtype_tol
    b, h, t, d = shape
    torch.manual_seed(0)
    # non-contiguous input, as attention produces it: [B, T, H, D] viewed as [B, H, T, D]
    x = torch.randn(b, t, h, d, dtype=dtype).transpose(1, 2)
    cos, sin = _cos_sin(b, t, d, dtype)
    dy = torch.randn(b, h, t, d, dtype=dtype)
    got, (got_dx,) = grads_of(lambda a: rope(a, cos, sin), (x,), dy)
    want, (want_dx,) = grads_of(lambda a: rope_reference(a, cos, sin), (x,), dy)
    assert_close(got, want, atol, rtol)
    assert_close(got_dx, want_dx, atol, rtol)


def test_reference_equals_hf_apply_rotary_pos_emb():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16)
    cos, sin = _cos_sin(2, 7, 16, torch.float32)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(rope_reference(q, cos, sin), hf_q)
    assert torch.equal(rope_reference(k, cos, sin), hf_k)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="cos/sin must be"):
        rope(torch.randn(1, 2, 3, 4), torch.randn(1, 3, 6), torch.randn(1, 3, 6))
