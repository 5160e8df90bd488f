"""GGUF quantized tensors read as they are shipped, into mlx's quantized layouts (numpy, no
torch). No fp32 copy of a quantized weight is ever made, except DeepSeek's few that the zoo
keeps in full precision (MoE routers; ``kv_b_proj`` where a file splits it into ``attn_k_b``,
quantized along the other axis, and ``attn_v_b``: ``gguf_deepseek``); F32/F16 tensors load as
fp32. A 3-D tensor (stacked experts) is read as its rows, each part ``[experts, rows, ...]``.
Layouts: mlx_kernels.quantized_linear.

- int4 (``qweight`` [N, K/2], ``scales`` and ``mins`` [N, K/32], ``w = q * scale + min``):
  Q4_0 = fp16 d + 16 bytes (element j in byte j's low nibble, j + 16 in its high one),
  w = (q - 8) d; Q4_1 = fp16 d, fp16 m + 16 bytes, w = q d + m (scales and mins stay fp16);
  Q4_K = super-blocks of 256: fp16 d and dmin, 12 bytes packing eight 6-bit scales and mins,
  128 bytes of nibbles (32 bytes per pair of sub-blocks: the first sub-block's 32 values in
  the low nibbles, the second's in the high ones), w = q (d sc) - (dmin m), each sub-block of
  32 a group (scales and mins fp32: ``d sc`` has up to 17 significant bits).
- int8 in groups (``qweight`` [N, K], ``scale`` [N, K/G] fp32, ``w = q * scale``):
  Q8_0 = fp16 d + 32 int8, G = 32; Q5_0 = fp16 d, 32 high bits, 16 bytes of low nibbles,
  w = (q - 16) d, G = 32; Q6_K = super-blocks of 256: 128 bytes of low nibbles, 64 bytes of
  2-bit highs, 16 int8 scales and fp16 d, w = (q - 32) (d sc), G = 16.

Q5_1 and Q5_K carry a minimum with 5-bit values, which neither layout holds; they, the other
K-quants and the IQ types are refused by name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlx_core.gguf_convert import (
    GGUFModel,
    as_hf_values,
    dequantized,
    hf_config,
    named_tensors,
    split_fused,
    unpermute_rows,
)
from mlx_core.gguf_deepseek import READ_DEQUANTIZED

BLOCK = 32
SUPER_BLOCK = 256  # the K-quants'
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
INT8_TYPES = ("Q8_0", "Q5_0", "Q6_K")
NATIVE_TYPES = ("F32", "F16", *INT4_TYPES, *INT8_TYPES)


def _fp16(block_bytes: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.ascontiguousarray(block_bytes).view(np.float16)[..., 0])


def _packed(q: np.ndarray) -> np.ndarray:
    """int4 values ``[N, K]`` (0..15) packed two to a byte, even elements in the low nibble."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def _nibbles(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return data & 15, data >> 4


def q4_blocks(data: np.ndarray, rows: int, cols: int, with_min: bool):
    """``(qweight, scales, mins)`` from Q4_1 (``with_min``) or Q4_0 blocks."""
    blocks = data.reshape(rows, cols // BLOCK, 20 if with_min else 18)
    scales = _fp16(blocks[..., 0:2])
    mins = _fp16(blocks[..., 2:4]) if with_min else (-8.0 * scales).astype(np.float16)  # exact
    nibbles = blocks[..., 4:] if with_min else blocks[..., 2:]
    q = np.concatenate(_nibbles(nibbles), axis=-1).reshape(rows, cols)
    return _packed(q), scales, mins


def q4_k_blocks(data: np.ndarray, rows: int, cols: int):
    """``(qweight, scales, mins)`` from Q4_K super-blocks, a group per sub-block of 32."""
    blocks = data.reshape(rows, cols // SUPER_BLOCK, 144)
    d = _fp16(blocks[..., 0:2]).astype(np.float32)
    dmin = _fp16(blocks[..., 2:4]).astype(np.float32)
    packed = blocks[..., 4:16]  # bytes 0-3: scales 0-3 (low 6 bits), 4-7: mins 0-3, 8-11: both
    low_sc, low_m, high = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([low_sc & 63, (high & 15) | ((low_sc >> 2) & 48)], axis=-1)
    m = np.concatenate([low_m & 63, (high >> 4) | ((low_m >> 2) & 48)], axis=-1)
    scales = (d[..., None] * sc.astype(np.float32)).reshape(rows, cols // BLOCK)
    mins = -(dmin[..., None] * m.astype(np.float32)).reshape(rows, cols // BLOCK)
    qs = blocks[..., 16:].reshape(rows, cols // SUPER_BLOCK, 4, 32)
    q = np.stack(_nibbles(qs), axis=-2).reshape(rows, cols)  # per 32 bytes: lows, then highs
    return _packed(q), scales, mins


def q8_blocks(data: np.ndarray, rows: int, cols: int):
    """``(qweight, scale)`` from Q8_0 blocks."""
    blocks = data.reshape(rows, cols // BLOCK, 34)
    q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(rows, cols)
    return q, _fp16(blocks[..., 0:2]).astype(np.float32)


def q5_0_blocks(data: np.ndarray, rows: int, cols: int):
    """``(qweight, scale)`` from Q5_0 blocks: the 5-bit values less 16 fit int8 as they are."""
    blocks = data.reshape(rows, cols // BLOCK, 22)
    high_bits = np.ascontiguousarray(blocks[..., 2:6]).view(np.uint32)  # [rows, blocks, 1]
    high = ((high_bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    low = np.concatenate(_nibbles(blocks[..., 6:]), axis=-1)
    q = ((low | (high << 4)).astype(np.int8) - np.int8(16)).reshape(rows, cols)
    return q, _fp16(blocks[..., 0:2]).astype(np.float32)


def q6_k_blocks(data: np.ndarray, rows: int, cols: int):
    """``(qweight, scale)`` from Q6_K super-blocks, a group per 16 values."""
    blocks = data.reshape(rows, cols // SUPER_BLOCK, 210)
    low = blocks[..., 0:128].reshape(rows, -1, 2, 64)  # per half of 128 values: 64 bytes
    low = np.stack(_nibbles(low), axis=-2)  # [.., half, 2, 64]: values 0-63 low, 64-127 high
    high = blocks[..., 128:192].reshape(rows, -1, 2, 1, 32)  # per half: 32 bytes of 4 x 2 bits
    high = (high >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3  # [.., half, 4, 32]
    q = (low.reshape(rows, -1, 2, 128) | (high.reshape(rows, -1, 2, 128) << 4)).astype(np.int8)
    q = (q - np.int8(32)).reshape(rows, cols)
    sub_scales = np.ascontiguousarray(blocks[..., 192:208]).view(np.int8).astype(np.float32)
    d = _fp16(blocks[..., 208:210]).astype(np.float32)
    return q, (d[..., None] * sub_scales).reshape(rows, cols // 16)


_READERS = {
    "Q4_0": lambda data, rows, cols: q4_blocks(data, rows, cols, with_min=False),
    "Q4_1": lambda data, rows, cols: q4_blocks(data, rows, cols, with_min=True),
    "Q4_K": q4_k_blocks, "Q8_0": q8_blocks, "Q5_0": q5_0_blocks, "Q6_K": q6_k_blocks,
}


def read_gguf_blocks(path: str | Path) -> GGUFModel:
    """Every tensor of a GGUF file in mlx's layouts: ``NAME.weight`` (fp32) for float tensors,
    ``NAME.qweight`` / ``.scales`` / ``.mins`` for Q4_0/Q4_1, ``NAME.qweight`` / ``.scale`` for
    Q8_0, under HF Llama names. Any other type is refused, naming the ones read."""
    path = Path(path)
    meta, named = named_tensors(path, f"reading {path.name}")
    tensors: dict[str, np.ndarray] = {}
    for entry in named:
        name, t, heads = entry.name, entry.tensor, entry.heads
        kind = t.tensor_type.name
        shape = tuple(reversed([int(s) for s in t.shape]))  # numpy's order: [..., rows, cols]
        rows, cols = int(np.prod(shape[:-1])), shape[-1]
        prefix = name.removesuffix(".weight")
        if kind in ("F32", "F16") or name.endswith(READ_DEQUANTIZED):
            w = np.array(dequantized(t).reshape(shape))  # a copy: torch takes writable arrays
            tensors[name] = as_hf_values(w, entry)
        elif entry.offset:  # llama.cpp keeps norms in float; an offset on codes would be wrong
            raise ValueError(f"{path.name}: tensor {t.name} is {kind}; mlx reads this one "
                             "(a norm) as F32 or F16 only")
        elif kind in _READERS:
            parts = _READERS[kind](np.asarray(t.data), rows, cols)
            suffixes = ("qweight", "scales", "mins") if kind in INT4_TYPES else ("qweight", "scale")
            for suffix, part in zip(suffixes, parts, strict=True):
                part = part.reshape(*shape[:-1], part.shape[-1])  # stacked: [experts, rows, ...]
                tensors[f"{prefix}.{suffix}"] = np.ascontiguousarray(unpermute_rows(part, heads))
        else:
            raise ValueError(f"{path.name}: tensor {t.name} is {kind}, which mlx does not read as "
                             f"it is shipped (it reads {', '.join(NATIVE_TYPES)}); load it with "
                             "quantization='int8' or 'int4' instead, which de-quantizes and "
                             "quantizes again")
    embedding = "model.embed_tokens"
    vocab = next(v.shape[0] for k, v in tensors.items()
                 if k in (f"{embedding}.weight", f"{embedding}.qweight"))
    tied = not any(k.startswith("lm_head.") for k in tensors)
    config = hf_config(meta, vocab, tied)
    split_fused(config, tensors)  # quantized rows split (experts unstacked) as fp32 ones are
    return GGUFModel(config, tensors, meta)
