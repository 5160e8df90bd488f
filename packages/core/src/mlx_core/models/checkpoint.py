"""HF checkpoint tensors <-> our parameter names, and safetensors IO with clear errors.

The Llama family (Llama, Mistral, Qwen2, SmolLM2) and Mixtral use our names as they are; GPT-2
maps through one table. Nothing here unpickles: weights are read from safetensors only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mlx_core.checkpoint_numpy import ArrayOps, map_hf_to_ours, map_ours_to_hf, safetensors_files

TORCH_OPS = ArrayOps(lambda t: t.t().contiguous(), lambda parts: torch.cat(parts, dim=0))


def hf_to_ours(config, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return map_hf_to_ours(config, tensors, TORCH_OPS)


def ours_to_hf(config, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return map_ours_to_hf(config, tensors, TORCH_OPS)


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
