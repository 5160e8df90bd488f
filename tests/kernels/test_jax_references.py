"""mlx_kernels.jax: each jax.numpy op equals the torch reference on the same inputs (fp32,
1e-5 unless stated)."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

import mlx_kernels as K
from mlx_kernels import jax as KJ
from mlx_kernels.kv_cache import write_kv_cache_reference
from mlx_kernels.lora import lora_linear_multi_reference
from mlx_kernels.moe import moe_grouped_matmul_reference, moe_route_reference, sort_by_expert
from mlx_kernels.nf4 import nf4_absmax, nf4_dequantize_reference
from mlx_kernels.paged_attention import paged_attention_decode_reference
from mlx_kernels.varlen_attention import varlen_attention_reference


def j(t):
    return jnp.asarray(t.detach().numpy())


def close(got, want, atol=1e-5):
    np.testing.assert_allclose(np.asarray(got), want.detach().numpy(), atol=atol, rtol=1e-5)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_elementwise_and_norm_ops():
    x, w = rand(6, 7, 123), rand(123, seed=1)
    close(KJ.rms_norm(j(x), j(w), 1e-6), K.rms_norm(x, w, 1e-6))
    q, cos, sin = rand(2, 3, 7, 24), rand(2, 7, 24, seed=2), rand(2, 7, 24, seed=3)
    close(KJ.rope(j(q), j(cos), j(sin)), K.rope(q, cos, sin))
    g, u = rand(5, 431), rand(5, 431, seed=4)
    close(KJ.swiglu(j(g), j(u)), K.swiglu(g, u))
    close(KJ.geglu(j(g), j(u)), K.geglu(g, u))


def test_fused_linear_cross_entropy_value_and_gradient():
    h, w = rand(301, 24), rand(500, 24, seed=1) * 0.1
    y = torch.randint(0, 500, (301,), generator=torch.Generator().manual_seed(2))
    y[::7] = -100
    for smoothing in (0.0, 0.1):
        close(KJ.fused_linear_cross_entropy(j(h), j(w), jnp.asarray(y.numpy()), label_smoothing=smoothing,
                                            chunk_size=64),
              F.cross_entropy(h @ w.T, y, label_smoothing=smoothing), atol=1e-5)
    grad = jax.grad(lambda hh: KJ.fused_linear_cross_entropy(hh, j(w), jnp.asarray(y.numpy()),
                                                              chunk_size=64))(j(h))
    ref = h.clone().requires_grad_()
    F.cross_entropy(ref @ w.T, y).backward()
    close(grad, ref.grad, atol=1e-6)


def test_paged_and_varlen_attention_and_kv_write():
    blocks, block, kv_heads, dim = 12, 4, 2, 16
    kc, vc = torch.zeros(blocks, block, kv_heads, dim), torch.zeros(blocks, block, kv_heads, dim)
    k, v = rand(9, kv_heads, dim), rand(9, kv_heads, dim, seed=1)
    slots = torch.tensor([20, 21, 22, 23, 8, 9, 10, -1, 40])
    write_kv_cache_reference(k, v, kc, vc, slots)
    jk, jv = KJ.write_kv_cache(j(k), j(v), j(torch.zeros_like(kc)), j(torch.zeros_like(vc)),
                               jnp.asarray(slots.numpy()))
    close(jk, kc)
    close(jv, vc)
    tables = torch.tensor([[5, 2, 10], [2, 10, 0]], dtype=torch.int32)
    lens = torch.tensor([9, 6], dtype=torch.int32)
    q = rand(2, 4, dim, seed=2)
    for window in (None, 3):
        close(KJ.paged_attention_decode(j(q), jk, jv, jnp.asarray(tables.numpy()), jnp.asarray(lens.numpy()),
                                        sliding_window=window),
              paged_attention_decode_reference(q, kc, vc, tables, lens, sliding_window=window))
    cu = torch.tensor([0, 5, 22, 23], dtype=torch.int32)
    qq, kk, vv = rand(23, 4, dim), rand(23, 2, dim, seed=5), rand(23, 2, dim, seed=6)
    close(KJ.varlen_attention(j(qq), j(kk), j(vv), cu, cu, sliding_window=4),
          varlen_attention_reference(qq, kk, vv, cu, cu, sliding_window=4))


def test_lora_nf4_and_moe():
    x, w, a, b = rand(9, 45), rand(70, 45, seed=1), rand(6, 45, seed=2), rand(70, 6, seed=3)
    close(KJ.lora_linear(j(x), j(w), j(a), j(b), 0.5), K.lora_linear(x, w, a, b, 0.5), atol=1e-4)
    stacks_a, stacks_b = rand(3, 6, 45, seed=4), rand(3, 70, 6, seed=5)
    ids, scalings = torch.tensor([0, 2, -1, 1, 1, 0, -1, 2, 2]), torch.tensor([0.5, 1.0, 2.0])
    close(KJ.lora_linear_multi(j(x), j(w), j(stacks_a), j(stacks_b), jnp.asarray(ids.numpy()), j(scalings)),
          lora_linear_multi_reference(x, w, stacks_a, stacks_b, ids, scalings), atol=1e-4)
    q = K.nf4_quantize(rand(96, 64))
    close(KJ.nf4_dequantize(j(q.codes), j(nf4_absmax(q)), (96, 64)), nf4_dequantize_reference(q))
    logits = rand(37, 6)
    weights, experts = KJ.moe_route(j(logits), 2)
    ref_weights, ref_experts = moe_route_reference(logits, 2)
    close(weights, ref_weights)
    assert np.array_equal(np.asarray(experts), ref_experts.numpy())
    order, offsets = sort_by_expert(ref_experts, 6)
    xs, ws = rand(74, 45)[order], rand(6, 70, 45, seed=7)
    close(KJ.moe_grouped_matmul(j(xs), j(ws), offsets), moe_grouped_matmul_reference(xs, ws, offsets), atol=1e-4)


def test_attention_matches_sdpa_with_gqa_and_padding():
    """The zoo's attention: GQA (4 query heads over 2 kv heads) with a causal mask and a
    left-padded row, against torch SDPA on repeated kv heads."""
    q, k, v = rand(2, 4, 5, 16), rand(2, 2, 7, 16, seed=1), rand(2, 2, 7, 16, seed=2)
    causal = torch.ones(5, 7, dtype=torch.bool).tril(diagonal=2)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, :2] = False
    mask = (causal[None] & valid[:, None])[:, None]  # [B, 1, T, S]; every row keeps a key
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                          attn_mask=mask)
    close(KJ.attention(j(q), j(k), j(v), j(mask)), want)
    close(KJ.attention(j(q), j(k), j(v), j(mask), scale=0.3),
          F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                         attn_mask=mask, scale=0.3))
