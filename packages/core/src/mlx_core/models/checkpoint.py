"""HF checkpoint tensors <-> our parameter names, and safetensors IO with clear errors.

The Llama family (Llama, Mistral, Qwen2, SmolLM2) and Mixtral use our names as they are; GPT-2
maps through one table. Nothing here unpickles: weights are read from safetensors only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# The name tables live in the torch-free module, shared with mlx-jax.
from mlx_core.checkpoint_numpy import GPT2_QKV as _GPT2_QKV
from mlx_core.checkpoint_numpy import GPT2_TABLE as _GPT2_TABLE
from mlx_core.checkpoint_numpy import IGNORED as _IGNORED
from mlx_core.checkpoint_numpy import OUR_QKV as _OUR_QKV
from mlx_core.checkpoint_numpy import name_template as _template
from mlx_core.checkpoint_numpy import safetensors_files


def hf_to_ours(model_type: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = {k: v for k, v in tensors.items() if not _IGNORED.search(k)}
    if model_type != "gpt2":
        return tensors
    out = {}
    for name, t in tensors.items():
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name  # GPT2Model saves without the prefix
        template, layer = _template(name)
        if template.startswith("transformer.h.{}.attn.c_attn."):
            kind = template.rsplit(".", 1)[1]
            parts = (t.t() if kind == "weight" else t).chunk(3, dim=0)
            for proj, part in zip("qkv", parts, strict=True):
                out[_OUR_QKV.format(layer, proj, kind)] = part.contiguous()
        elif template in _GPT2_TABLE:
            ours, transpose = _GPT2_TABLE[template]
            out[ours.format(layer)] = t.t().contiguous() if transpose else t
        else:
            out[name] = t  # reported as unexpected by the loader, with its name
    return out


def ours_to_hf(model_type: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if model_type != "gpt2":
        return dict(tensors)
    reverse = {ours: (hf, transpose) for hf, (ours, transpose) in _GPT2_TABLE.items()}
    out, qkv = {}, {}
    for name, t in tensors.items():
        template, layer = _template(name)
        m = re.fullmatch(r"model\.layers\.\{\}\.self_attn\.([qkv])_proj\.(weight|bias)", template)
        if m:
            qkv.setdefault((layer, m.group(2)), {})[m.group(1)] = t
            continue
        hf, transpose = reverse[template]
        out[hf.format(layer)] = t.t().contiguous() if transpose else t
    for (layer, kind), parts in qkv.items():
        packed = torch.cat([parts[p] for p in "qkv"], dim=0)
        out[_GPT2_QKV.format(layer, kind)] = packed.t().contiguous() if kind == "weight" else packed
    return out


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in safetensors_files(directory):
        if not f.is_file():
            raise FileNotFoundError(f"weights file {f} is listed in the index but missing")
        try:
            tensors.update(load_file(f, device="cpu"))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"cannot read weights file {f}: it is corrupt or truncated ({e})") from None
    return tensors


def write_safetensors(directory: Path, tensors: dict[str, torch.Tensor],
                      max_shard_bytes: int | None = None) -> None:
    """Write ``model.safetensors``, or shards plus ``model.safetensors.index.json``."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
