"""GGUF quantized tensors read as they are shipped, into mlx's quantized layouts (numpy, no
torch): Q4_0 and Q4_1 into int4 (``qweight`` [N, K/2], ``scales``, ``mins``, groups of 32),
Q8_0 into int8 with a scale per 32 inputs (``qweight`` [N, K], ``scale`` [N, K/32]); F32/F16
tensors as fp32. No fp32 copy of a quantized weight is ever made. Layouts: mlx_kernels.quantized_linear.

GGUF blocks (ggml): Q4_0 = fp16 d + 16 bytes (element j in byte j's low nibble, j + 16 in its
high one), w = (q - 8) d; Q4_1 = fp16 d, fp16 m + 16 bytes, w = q d + m; Q8_0 = fp16 d + 32
int8, w = q d.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlx_core.gguf_convert import GGUFModel, hf_config, named_tensors, unpermute_rows

BLOCK = 32
NATIVE_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")


def _fp16(block_bytes: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.ascontiguousarray(block_bytes).view(np.float16)[..., 0])


def q4_blocks(data: np.ndarray, rows: int, cols: int, with_min: bool):
    """``(qweight, scales, mins)`` from Q4_1 (``with_min``) or Q4_0 blocks."""
    blocks = data.reshape(rows, cols // BLOCK, 20 if with_min else 18)
    scales = _fp16(blocks[..., 0:2])
    mins = _fp16(blocks[..., 2:4]) if with_min else (-8.0 * scales).astype(np.float16)  # exact
    nibbles = blocks[..., 4:] if with_min else blocks[..., 2:]
    q = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1).reshape(rows, cols)
    return q[:, 0::2] | (q[:, 1::2] << 4), scales, mins


def q8_blocks(data: np.ndarray, rows: int, cols: int):
    """``(qweight, scale)`` from Q8_0 blocks."""
    blocks = data.reshape(rows, cols // BLOCK, 34)
    q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(rows, cols)
    return q, _fp16(blocks[..., 0:2]).astype(np.float32)


def read_gguf_blocks(path: str | Path) -> GGUFModel:
    """Every tensor of a GGUF file in mlx's layouts: ``NAME.weight`` (fp32) for float tensors,
    ``NAME.qweight`` / ``.scales`` / ``.mins`` for Q4_0/Q4_1, ``NAME.qweight`` / ``.scale`` for
    Q8_0, under HF Llama names. Any other type is refused, naming the ones read."""
    path = Path(path)
    meta, named = named_tensors(path, f"reading {path.name}")
    tensors: dict[str, np.ndarray] = {}
    for name, t, heads in named:
        kind = t.tensor_type.name
        rows, cols = (int(t.shape[1]), int(t.shape[0])) if len(t.shape) == 2 else (None, None)
        prefix = name.removesuffix(".weight")
        if kind in ("F32", "F16"):
            w = np.array(t.data, dtype=np.float32).reshape(tuple(reversed([int(s) for s in t.shape])))
            tensors[name] = unpermute_rows(np.ascontiguousarray(w), heads)
        elif kind in ("Q4_0", "Q4_1"):
            parts = q4_blocks(np.asarray(t.data), rows, cols, with_min=kind == "Q4_1")
            for suffix, part in zip(("qweight", "scales", "mins"), parts, strict=True):
                tensors[f"{prefix}.{suffix}"] = np.ascontiguousarray(unpermute_rows(part, heads))
        elif kind == "Q8_0":
            for suffix, part in zip(("qweight", "scale"), q8_blocks(np.asarray(t.data), rows, cols),
                                    strict=True):
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
    return GGUFModel(hf_config(meta, vocab, tied), tensors, meta)
