"""PiSSA / OLoRA adapters as plain LoRA, for the original base model (PEFT's
``save_pretrained(..., path_initial_model_for_weight_conversion=DIR)``).

PiSSA and OLoRA start from ``W = W_res + s B0 A0`` and train on the residual ``W_res``; after
training the model is ``W_res + s B A = W + s (B A - B0 A0)``. That difference is a LoRA of twice
the rank, ``A' = [A; A0]`` and ``B' = [B, -B0]``, with alpha doubled (times sqrt 2 under rsLoRA)
so the scaling stays ``s``: it applies to the unmodified base like any LoRA adapter, and can be
served and combined with others. ``DIR`` is the adapter as saved right after initialisation,
before training.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mlx_adapters.peft_format import adapter_state
from mlx_core.peft_config import LoraConfig
from mlx_core.peft_rules import WEIGHTS_NAME


def _initial_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no {WEIGHTS_NAME} in {directory}: path_initial_model_for_weight_conversion must be "
            "the adapter saved right after initialisation, before training (set "
            "init_lora_weights=True on its config, then save_pretrained(DIR))")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read {path}: it is corrupt or truncated ({e})") from None


def converted_config(config: LoraConfig) -> LoraConfig:
    out = copy.deepcopy(config)
    out.init_lora_weights = True
    out.r = 2 * config.r
    out.lora_alpha = config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2)
    out.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    out.alpha_pattern = {k: 2 * v for k, v in config.alpha_pattern.items()}
    return out


def as_plain_lora(model, adapter_name: str, initial_dir: str | Path
                  ) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The config and tensors of adapter ``adapter_name`` as a LoRA on the original base."""
    config = model.peft_config[adapter_name]
    if type(config) is not LoraConfig:
        raise ValueError(f"only LoRA adapters (PiSSA / OLoRA initialised) convert to plain LoRA; "
                         f"{adapter_name!r} is {type(config).__name__}")
    if config.use_dora or config.lora_bias:
        raise ValueError(f"adapter {adapter_name!r} uses {'DoRA' if config.use_dora else 'lora_bias'},"
                         " whose extra tensors have no place in the rank-2r LoRA of the conversion")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError("the conversion cannot keep the scaling of rsLoRA with rank_pattern or "
                         "alpha_pattern (as in PEFT); save without path_initial_model_for_weight_conversion")
    initial = _initial_tensors(Path(initial_dir))
    trained = adapter_state(model, adapter_name)
    out = {}
    for key, tensor in trained.items():
        side = key.split(".")[-2]
        if side not in ("lora_A", "lora_B"):
            out[key] = tensor  # modules_to_save, trained biases: the residual does not touch them
            continue
        start = initial.get(key)
        if start is None or start.shape != tensor.shape:
            raise ValueError(f"the initial adapter in {initial_dir} does not match {adapter_name!r}: "
                             f"{key} is {None if start is None else tuple(start.shape)} there, "
                             f"{tuple(tensor.shape)} here (another model, rank or target modules?)")
        start = start.to(tensor.dtype)
        out[key] = torch.cat([tensor, start], 0) if side == "lora_A" else torch.cat([tensor, -start], 1)
    return converted_config(config), out
