"""The mlx_kernels ops for JAX, as ``jax.numpy`` references with the torch ops' shapes and
semantics (tested against the torch references on CPU), plus ``attention``, the dense masked
attention the Flax zoo (``mlx_jax``) trains and generates with. On GPU these are what XLA
compiles; the jax-triton path to the Triton kernels is not wired yet.

``import mlx_kernels.jax`` needs jax and never torch (``pip install 'mlx-kernels[jax]'``): the
package's torch ops load lazily and the NF4 constants come from the torch-free ``nf4_format``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mlx_kernels.nf4_format import BLOCK_SIZE as NF4_BLOCK
from mlx_kernels.nf4_format import NF4_CODEBOOK


def rms_norm(x, weight, eps: float = 1e-6):
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
    return weight * h.astype(x.dtype)


def rope(x, cos, sin):
    """``x [B, H, T, D]``, ``cos/sin [B, T, D]`` (HF's rotate_half convention)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate((-x2, x1), axis=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def swiglu(gate, up):
    return jax.nn.silu(gate) * up


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def geglu(gate, up):
    return gelu_tanh(gate) * up


def fused_linear_cross_entropy(hidden, weight, labels, *, bias=None, ignore_index: int = -100,
                               label_smoothing: float = 0.0, reduction: str = "mean",
                               chunk_size: int = 256):
    """Chunked over tokens with ``jax.checkpoint`` per chunk, so neither the forward nor the
    gradient keeps the full ``[N, V]`` logits."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    n, vocab = hidden.shape[0], weight.shape[0]
    pad = -n % chunk_size
    h = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(-1, chunk_size, hidden.shape[1])
    y = jnp.pad(labels, (0, pad), constant_values=ignore_index).reshape(-1, chunk_size)

    @jax.checkpoint
    def chunk_loss(h_chunk, y_chunk):
        logits = (h_chunk @ weight.T).astype(jnp.float32)
        if bias is not None:
            logits = logits + bias
        lse = jax.nn.logsumexp(logits, axis=-1)
        keep = y_chunk != ignore_index
        target = jnp.take_along_axis(logits, jnp.clip(y_chunk, 0, vocab - 1)[:, None], axis=-1)[:, 0]
        loss = lse - target
        if label_smoothing:
            loss = (1 - label_smoothing) * loss + label_smoothing * (lse - logits.mean(-1))
        return jnp.where(keep, loss, 0.0).sum()

    total = jax.lax.map(lambda args: chunk_loss(*args), (h, y)).sum()
    if reduction == "mean":
        return total / (labels != ignore_index).sum()
    return total


def write_kv_cache(key, value, key_cache, value_cache, slot_mapping):
    """Functional: returns the updated ``(key_cache, value_cache)``; slot -1 writes nothing."""
    flat_shape = (-1, *key_cache.shape[2:])
    slots = jnp.where(slot_mapping >= 0, slot_mapping, key_cache.shape[0] * key_cache.shape[1])
    kc = key_cache.reshape(flat_shape).at[slots].set(key, mode="drop").reshape(key_cache.shape)
    vc = value_cache.reshape(flat_shape).at[slots].set(value, mode="drop").reshape(value_cache.shape)
    return kc, vc


def attention(q, k, v, mask, scale=None, softcap=None):
    """``q [B, Hq, T, D]``, ``k, v [B, Hkv, S, D]``, ``mask`` bool ``[B, 1, T, S]`` (True: may
    attend) -> ``[B, Hq, T, D]`` in ``q``'s dtype; scores, softmax and the weighted sum in fp32;
    ``softcap`` (Gemma 2): scores become ``softcap * tanh(scores / softcap)`` before the mask.

    GQA groups query heads over their shared key head instead of repeating k and v. ``scale``:
    None divides the scores by ``sqrt(D)``, a number multiplies them. A query row with no
    allowed key comes out NaN: masks must leave every query at least one key.
    """
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, t, d).astype(jnp.float32)
    scores = jnp.einsum("bkgtd,bksd->bkgts", qg, k.astype(jnp.float32))
    scores = scores / math.sqrt(d) if scale is None else scores * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, :, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v.astype(jnp.float32))
    return out.reshape(b, hq, t, d).astype(q.dtype)


def paged_attention_decode(query, key_cache, value_cache, block_tables, context_lens, *,
                           scale=None, sliding_window=None):
    b = query.shape[0]
    tables = jnp.maximum(block_tables, 0)
    keys = key_cache[tables].reshape(b, -1, *key_cache.shape[2:])
    values = value_cache[tables].reshape(b, -1, *value_cache.shape[2:])
    pos = jnp.arange(keys.shape[1])[None, :]
    mask = pos < context_lens[:, None]
    if sliding_window is not None:
        mask = mask & (pos >= context_lens[:, None] - sliding_window)
    out = attention(query[:, :, None], keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3),
                    mask[:, None, None], scale)
    return out[:, :, 0]


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=True, sliding_window=None,
                     scale=None, block_tables=None):
    """Eager reference (a Python loop over sequences; sequence lengths must be concrete)."""
    cu_q, cu_k = [int(i) for i in cu_seqlens_q], [int(i) for i in cu_seqlens_k]
    pieces = []
    for i in range(len(cu_q) - 1):
        lq, lk = cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i]
        if block_tables is None:
            keys, values = k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]
        else:
            used = block_tables[i][: -(-lk // k.shape[1])]
            keys = k[used].reshape(-1, *k.shape[2:])[:lk]
            values = v[used].reshape(-1, *v.shape[2:])[:lk]
        q_pos = jnp.arange(lq)[:, None] + (lk - lq)
        k_pos = jnp.arange(lk)[None, :]
        mask = jnp.ones((lq, lk), dtype=bool)
        if causal:
            mask = mask & (k_pos <= q_pos)
        if sliding_window is not None:
            mask = mask & (q_pos - k_pos < sliding_window)
        out = attention(q[None, cu_q[i]:cu_q[i + 1]].transpose(0, 2, 1, 3),
                        keys[None].transpose(0, 2, 1, 3), values[None].transpose(0, 2, 1, 3),
                        mask[None, None], scale)
        pieces.append(out[0].transpose(1, 0, 2))
    return jnp.concatenate(pieces, axis=0)


def lora_linear(x, weight, lora_a, lora_b, scaling: float, bias=None):
    """``x @ W.T + b + scaling * (x @ A.T) @ B.T``; the low-rank term is added last, in the
    base output's dtype (the adapter may be kept in another dtype than the base weight)."""
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    return y + (scaling * ((x @ lora_a.T) @ lora_b.T)).astype(y.dtype)


def lora_linear_multi(x, weight, lora_a, lora_b, adapter_ids, scalings, bias=None):
    y = x @ weight.T if bias is None else x @ weight.T + bias
    ids = jnp.maximum(adapter_ids, 0)
    shrunk = jnp.einsum("ni,nri->nr", x, lora_a[ids])
    delta = jnp.einsum("nr,nor->no", shrunk, lora_b[ids]) * scalings[ids][:, None]
    return y + jnp.where(adapter_ids[:, None] >= 0, delta, 0.0)


def nf4_dequantize(codes, absmax, shape, dtype=jnp.float32):
    """``codes`` uint8 (two 4-bit codes per byte, high nibble first), ``absmax`` fp32 per 64."""
    codebook = jnp.asarray(NF4_CODEBOOK, dtype=jnp.float32)
    nibbles = jnp.stack([codes >> 4, codes & 0xF], axis=1).reshape(-1, NF4_BLOCK)
    return (codebook[nibbles] * absmax[:, None]).reshape(shape).astype(dtype)


def nf4_matmul(x, codes, absmax, shape, bias=None):
    y = x @ nf4_dequantize(codes, absmax, shape, x.dtype).T
    return y if bias is None else y + bias


def moe_route(router_logits, top_k: int, renormalize: bool = True):
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if renormalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights, experts


def sort_by_expert(experts, num_experts: int):
    """As the torch op: the stable order grouping the (token, slot) pairs of ``experts [N, k]``
    by expert, and the ``offsets [E + 1]`` of each expert's rows (static shapes: it jits)."""
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    counts = jnp.bincount(flat, length=num_experts)
    return order, jnp.concatenate([jnp.zeros(1, counts.dtype), jnp.cumsum(counts)])


def moe_grouped_matmul(x, weights, offsets):
    """Rows grouped by expert (``x [M, in]``, ``weights [E, out, in]``, ``offsets [E + 1]``):
    ``jax.lax.ragged_dot``, shape-static (it jits) and differentiable; a grouped kernel on
    GPU/TPU (on CPU, XLA's fallback masks the dense products)."""
    offsets = jnp.asarray(offsets)
    sizes = (offsets[1:] - offsets[:-1]).astype(jnp.int32)
    return jax.lax.ragged_dot(x, jnp.swapaxes(weights, 1, 2), sizes)
