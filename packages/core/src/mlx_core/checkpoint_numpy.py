"""HF checkpoint names and safetensors reading as numpy, with no torch import.

The HF <-> zoo name maps (``map_hf_to_ours`` / ``map_ours_to_hf``) and the loaders' tensor
check (``check_tensors``) are written once here for any array type: the torch zoo
(``models/checkpoint.py``, ``models/loading.py``) and torch-free backends (mlx-jax) call them
with their own ``ArrayOps``. bf16 tensors are widened to fp32 exactly (numpy has no bf16);
callers cast to the dtype they compute in.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Derived tensors some HF versions save; they are recomputed, never loaded.
IGNORED = re.compile(r"(rotary_emb\.inv_freq|(^|\.)attn\.(bias|masked_bias))$")

# GPT-2: HF name (``{}`` = layer) -> (our name, transpose). Conv1D stores weights as [in, out].
GPT2_TABLE = {
    "transformer.wte.weight": ("model.embed_tokens.weight", False),
    "transformer.wpe.weight": ("model.embed_positions.weight", False),
    "transformer.ln_f.weight": ("model.norm.weight", False),
    "transformer.ln_f.bias": ("model.norm.bias", False),
    "transformer.h.{}.ln_1.weight": ("model.layers.{}.input_layernorm.weight", False),
    "transformer.h.{}.ln_1.bias": ("model.layers.{}.input_layernorm.bias", False),
    "transformer.h.{}.ln_2.weight": ("model.layers.{}.post_attention_layernorm.weight", False),
    "transformer.h.{}.ln_2.bias": ("model.layers.{}.post_attention_layernorm.bias", False),
    "transformer.h.{}.attn.c_proj.weight": ("model.layers.{}.self_attn.o_proj.weight", True),
    "transformer.h.{}.attn.c_proj.bias": ("model.layers.{}.self_attn.o_proj.bias", False),
    "transformer.h.{}.mlp.c_fc.weight": ("model.layers.{}.mlp.up_proj.weight", True),
    "transformer.h.{}.mlp.c_fc.bias": ("model.layers.{}.mlp.up_proj.bias", False),
    "transformer.h.{}.mlp.c_proj.weight": ("model.layers.{}.mlp.down_proj.weight", True),
    "transformer.h.{}.mlp.c_proj.bias": ("model.layers.{}.mlp.down_proj.bias", False),
    "lm_head.weight": ("lm_head.weight", False),
}
# GPT-2 packs q, k, v into one Conv1D: split on load, concatenate on save.
GPT2_QKV = "transformer.h.{}.attn.c_attn.{}"
OUR_QKV = "model.layers.{}.self_attn.{}_proj.{}"


def name_template(name: str) -> tuple[str, str | None]:
    """``transformer.h.3.ln_1.weight`` -> (``transformer.h.{}.ln_1.weight``, ``"3"``)."""
    m = re.search(r"\.(\d+)\.", name)
    if not m:
        return name, None
    return name[: m.start()] + ".{}." + name[m.end():], m.group(1)


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / f for f in sorted(set(weight_map.values()))]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        found = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
        raise FileNotFoundError(
            f"no *.safetensors weights in {directory} (found: {found}). mlx reads safetensors "
            "only and never unpickles .bin checkpoints; convert them with transformers' "
            "save_pretrained(dir, safe_serialization=True)"
        )
    return files


_NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
                 "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _read_file(path: Path) -> dict[str, np.ndarray]:
    """Parse one safetensors file: 8-byte header size, JSON header, then raw little-endian data."""
    data = path.read_bytes()
    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_size])
    body = memoryview(data)[8 + header_size:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        kind, shape = info["dtype"], tuple(info["shape"])
        if kind == "BF16":  # bf16 is the top half of fp32: widen exactly
            raw = np.frombuffer(body[start:end], dtype="<u2").astype(np.uint32) << 16
            out[name] = raw.view(np.float32).reshape(shape)
        elif kind in _NUMPY_DTYPES:
            out[name] = np.frombuffer(body[start:end], dtype=_NUMPY_DTYPES[kind]).reshape(shape)
        else:
            raise ValueError(f"tensor {name} in {path} has dtype {kind}, which mlx cannot read")
    return out


def read_safetensors_numpy(directory: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory's ``*.safetensors`` (sharded or not) as numpy arrays."""
    directory = Path(directory)
    arrays: dict[str, np.ndarray] = {}
    for f in safetensors_files(directory):
        if not f.is_file():
            raise FileNotFoundError(f"weights file {f} is listed in the index but missing")
        try:
            arrays.update(_read_file(f))
        except (OSError, ValueError, KeyError, struct.error) as e:
            raise ValueError(f"cannot read weights file {f}: it is corrupt or truncated ({e})") from None
    return arrays


@dataclass(frozen=True)
class ArrayOps:
    """The two array operations the name maps need, for one array library."""

    transposed: Callable  # a 2-D array transposed, contiguous
    stacked_rows: Callable  # a list of arrays concatenated along their first axis


NUMPY_OPS = ArrayOps(lambda a: np.ascontiguousarray(a.T), lambda parts: np.concatenate(parts, axis=0))


# Phi-3 packs q/k/v into one projection and gate/up into another: split on load, joined on save
PHI3_QKV = "model.layers.{}.self_attn.qkv_proj.weight"
PHI3_GATE_UP = "model.layers.{}.mlp.gate_up_proj.weight"


def _phi3_to_ours(config, tensors: dict) -> dict:
    q = config.num_heads * config.dim_per_head
    kv = config.kv_heads * config.dim_per_head
    out = {}
    for name, a in tensors.items():
        template, layer = name_template(name)
        if template == PHI3_QKV:
            for proj, (start, end) in zip("qkv", ((0, q), (q, q + kv), (q + kv, q + 2 * kv)),
                                          strict=True):
                out[OUR_QKV.format(layer, proj, "weight")] = a[start:end]
        elif template == PHI3_GATE_UP:
            half = a.shape[0] // 2  # gate rows first, then up
            out[f"model.layers.{layer}.mlp.gate_proj.weight"] = a[:half]
            out[f"model.layers.{layer}.mlp.up_proj.weight"] = a[half:]
        else:
            out[name] = a
    return out


def _phi3_to_hf(tensors: dict, ops: ArrayOps) -> dict:
    out, packed = {}, {}
    for name, a in tensors.items():
        template, layer = name_template(name)
        m = re.fullmatch(r"model\.layers\.\{\}\.(self_attn\.([qkv])_proj|mlp\.(gate|up)_proj)\.weight",
                         template)
        if m:
            packed.setdefault(layer, {})[m.group(2) or m.group(3)] = a
        else:
            out[name] = a
    for layer, parts in packed.items():
        out[PHI3_QKV.format(layer)] = ops.stacked_rows([parts[p] for p in "qkv"])
        out[PHI3_GATE_UP.format(layer)] = ops.stacked_rows([parts["gate"], parts["up"]])
    return out


_LAYER_INDEX = re.compile(r"model\.layers\.(\d+)\.")


def _without_mtp_layers(config, tensors: dict) -> dict:
    """DeepSeek-V3 checkpoints append their multi-token-prediction module as layers past
    ``num_hidden_layers`` (V3's layer 61); decoding does not run it, and HF transformers drops it
    on load too: left out. (Drafting tokens with it, as speculative decoding would, is not
    built.)"""
    def in_model(name: str) -> bool:
        m = _LAYER_INDEX.match(name)
        return m is None or int(m.group(1)) < config.num_layers

    return {k: v for k, v in tensors.items() if in_model(k)}


def map_hf_to_ours(config, tensors: dict, ops: ArrayOps) -> dict:
    """HF checkpoint names -> the zoo's names, for a model of ``config`` (a ``ModelConfig``):
    GPT-2's Conv1D weights transposed and its packed q/k/v split, Phi-3's packed q/k/v and
    gate/up split; the other families share our names. Unknown names pass through, for the
    loader to report as unexpected."""
    model_type = config.model_type
    tensors = {k: v for k, v in tensors.items() if not IGNORED.search(k)}
    if model_type == "deepseek_v3":
        tensors = _without_mtp_layers(config, tensors)
    if model_type == "phi3":
        return _phi3_to_ours(config, tensors)
    if model_type != "gpt2":
        return tensors
    out = {}
    for name, a in tensors.items():
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name  # GPT2Model saves without the prefix
        template, layer = name_template(name)
        if template.startswith("transformer.h.{}.attn.c_attn."):
            kind = template.rsplit(".", 1)[1]
            packed = ops.transposed(a) if kind == "weight" else a
            rows = packed.shape[0] // 3
            for i, proj in enumerate("qkv"):
                out[OUR_QKV.format(layer, proj, kind)] = packed[i * rows:(i + 1) * rows]
        elif template in GPT2_TABLE:
            ours, transpose = GPT2_TABLE[template]
            out[ours.format(layer)] = ops.transposed(a) if transpose else a
        else:
            out[name] = a
    return out


def map_ours_to_hf(config, tensors: dict, ops: ArrayOps) -> dict:
    """The zoo's names -> HF checkpoint names (the inverse of ``map_hf_to_ours``)."""
    model_type = config.model_type
    if model_type == "phi3":
        return _phi3_to_hf(tensors, ops)
    if model_type != "gpt2":
        return dict(tensors)
    reverse = {ours: (hf, transpose) for hf, (ours, transpose) in GPT2_TABLE.items()}
    out, qkv = {}, {}
    for name, a in tensors.items():
        template, layer = name_template(name)
        m = re.fullmatch(r"model\.layers\.\{\}\.self_attn\.([qkv])_proj\.(weight|bias)", template)
        if m:
            qkv.setdefault((layer, m.group(2)), {})[m.group(1)] = a
            continue
        hf, transpose = reverse[template]
        out[hf.format(layer)] = ops.transposed(a) if transpose else a
    for (layer, kind), parts in qkv.items():
        packed = ops.stacked_rows([parts[p] for p in "qkv"])
        out[GPT2_QKV.format(layer, kind)] = ops.transposed(packed) if kind == "weight" else packed
    return out


def hf_to_ours_numpy(config, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return map_hf_to_ours(config, arrays, NUMPY_OPS)


def ours_to_hf_numpy(config, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return map_ours_to_hf(config, arrays, NUMPY_OPS)


def check_tensors(expected: dict[str, tuple], found: dict[str, tuple], *, where: str,
                  model_type: str) -> None:
    """Raise, naming them, if the tensors ``found`` (name -> shape) are not exactly those a model
    ``expected``: the missing, the unexpected, then the first of another shape."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:5]}")
        raise ValueError(f"weights in {where} do not match its config.json ({model_type}): "
                         + "; ".join(parts))
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            raise ValueError(f"tensor {name} in {where} has shape {tuple(found[name])}, but the "
                             f"config expects {tuple(shape)}: the weights and config.json disagree")
