import importlib

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


@pytest.fixture
def native_rope(monkeypatch):
    """The built native kernels (a C compiler is required: fails loudly if not), and a list that
    records each call of the native path, so a test knows the torch path did not answer."""
    from mlx_kernels import _cpu_native

    # by import path: the package's attribute `rope` is the function, not the module
    module = importlib.import_module("mlx_kernels.rope")

    assert _cpu_native.library() is not None, "no native CPU kernels: is a C compiler installed?"
    calls = []
    real = module._rope_native
    monkeypatch.setattr(module, "_rope_native", lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


@pytest.mark.parametrize("shape", [(2, 3, 7, 24), (1, 9, 64, 64), (3, 1, 11, 6), (1, 5, 1, 2)])
def test_native_equals_torch_path_bit_for_bit(native_rope, shape):
    """The C loop rounds each product, then adds, as the torch path does (no FMA): the same
    bits, for a query view of a fused projection's output (heads inside tokens, rows a stride
    apart) and for a contiguous [B, H, T, D] input; the output keeps the first layout."""
    from mlx_kernels.rope import _rotate

    b, h, t, d = shape
    torch.manual_seed(0)
    fused = torch.randn(b, t, (h + 2) * d)
    views = [fused[..., :h * d].view(b, t, h, d).transpose(1, 2), torch.randn(b, h, t, d)]
    cos, sin = _cos_sin(b, t, d, torch.float32)
    with torch.inference_mode():
        for x in views:
            got = rope(x, cos, sin)
            assert torch.equal(got, _rotate(x, cos.unsqueeze(1), sin.unsqueeze(1), False))
            torch.testing.assert_close(got, rope_reference(x, cos, sin))
        assert got.is_contiguous()
        assert rope(views[0], cos, sin).transpose(1, 2).is_contiguous()  # [B, T, H, D] memory
    assert native_rope == [shape] * 3


def test_native_only_in_fp32_inference_on_cpu(native_rope, monkeypatch):
    x = torch.randn(1, 2, 3, 8, requires_grad=True)
    cos, sin = _cos_sin(1, 3, 8, torch.float32)
    rope(x, cos, sin).sum().backward()  # autograd: the torch Function
    with torch.inference_mode():
        rope(x.detach().bfloat16(), cos.bfloat16(), sin.bfloat16())
        monkeypatch.setenv("MLX_KERNELS", "torch")
        rope(x.detach(), cos, sin)
    assert native_rope == []
