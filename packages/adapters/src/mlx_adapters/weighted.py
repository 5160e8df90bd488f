"""``add_weighted_adapter`` for LoRA, following PEFT's definitions so results match it."""

from __future__ import annotations

import dataclasses
import math

import torch

from mlx_adapters.config import LoraConfig
from mlx_adapters.lora import LoraLinear

COMBINATIONS = ("cat", "linear", "svd")


def _new_config(model, adapters, combination_type, svd_rank) -> LoraConfig:
    configs = [model.peft_config[a] for a in adapters]
    if not all(type(c) is LoraConfig for c in configs):  # not AdaLoRA, as in PEFT
        raise ValueError("add_weighted_adapter combines LoRA adapters only")
    if any(c.lora_bias for c in configs):
        raise ValueError("add_weighted_adapter does not combine lora_bias=True adapters (their "
                         "lora_B biases have no place in the combined A and B)")
    ranks = [c.r for c in configs]
    if combination_type == "linear" and len(set(ranks)) > 1:
        raise ValueError(f"combination_type='linear' needs adapters of one rank; got ranks {ranks}")
    rank = {"cat": sum(ranks), "linear": ranks[0], "svd": svd_rank or max(ranks)}[combination_type]
    targets = [c.target_modules for c in configs]
    if all(isinstance(t, str) for t in targets):
        merged_targets = "|".join(f"({t})" for t in targets)
    elif any(isinstance(t, str) for t in targets):
        raise ValueError("cannot combine adapters whose target_modules mix names and a regex")
    else:
        merged_targets = sorted(set().union(*targets))
    return dataclasses.replace(configs[0], r=rank, lora_alpha=rank, target_modules=merged_targets,
                               alpha_pattern={}, rank_pattern={})


def _combine(layer: LoraLinear, adapters, weights, combination_type, rank):
    present = [(a, w) for a, w in zip(adapters, weights, strict=True) if a in layer.lora_A]
    if combination_type == "cat":
        a = torch.cat([layer.lora_A[n].weight * w * layer.scaling[n] for n, w in present], dim=0)
        b = torch.cat([layer.lora_B[n].weight for n, _ in present], dim=1)
        return a, b
    if combination_type == "linear":
        a = sum(math.copysign(math.sqrt(abs(w * layer.scaling[n])), w * layer.scaling[n])
                * layer.lora_A[n].weight for n, w in present)
        b = sum(math.sqrt(abs(w * layer.scaling[n])) * layer.lora_B[n].weight for n, w in present)
        return a, b
    delta = sum(w * layer.delta_weight(n) for n, w in present)
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)
    return vh[:rank, :], u[:, :rank] @ torch.diag(s[:rank])


def combine_lora(model, adapters: list[str], weights: list[float], adapter_name: str,
                 combination_type: str, svd_rank: int | None) -> None:
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type must be one of {COMBINATIONS}, got {combination_type!r}")
    unknown = [a for a in adapters if a not in model.peft_config]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; this model has {list(model.peft_config)}")
    if adapter_name in model.peft_config:
        raise ValueError(f"adapter {adapter_name!r} already exists")
    config = _new_config(model, adapters, combination_type, svd_rank)
    model.add_adapter(adapter_name, config)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoraLinear) and adapter_name in layer.lora_A:
                layer.lora_A[adapter_name].weight.zero_()
                layer.lora_B[adapter_name].weight.zero_()
                if any(a in layer.lora_A for a in adapters):
                    a, b = _combine(layer, adapters, weights, combination_type, config.r)
                    layer.lora_A[adapter_name].weight[: a.shape[0]] = a
                    layer.lora_B[adapter_name].weight[:, : b.shape[1]] = b
