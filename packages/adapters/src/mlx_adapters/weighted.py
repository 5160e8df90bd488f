"""``add_weighted_adapter`` for LoRA, following PEFT's definitions so results match it.

Three families: ``cat`` (exact: the ranks side by side), the A/B-space merges (``linear``,
``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: A and B merged separately with
sqrt weights; adapters of one rank) and the delta-space merges (``svd`` and the same methods
with ``_svd``: the full ``dW`` merged, then truncated back to rank ``svd_rank`` by an SVD).
The merges themselves live in ``task_merging``.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from mlx_adapters import task_merging
from mlx_adapters.lora import LoraLinear
from mlx_adapters.modules_to_save import ModulesToSaveWrapper
from mlx_core.peft_config import LoraConfig

AB_SPACE = tuple(task_merging.METHODS)  # linear, magnitude_prune, ties, dare_linear, dare_ties
DELTA_SPACE = ("svd",) + tuple(f"{m}_svd" for m in AB_SPACE if m != "linear")
COMBINATIONS = ("cat",) + AB_SPACE + DELTA_SPACE


def _max_rank(config: LoraConfig) -> int:
    return max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r


def _new_config(model, adapters, combination_type, svd_rank) -> LoraConfig:
    configs = [model.peft_config[a] for a in adapters]
    if not all(type(c) is LoraConfig for c in configs):  # not AdaLoRA, as in PEFT
        raise ValueError("add_weighted_adapter combines LoRA adapters only")
    if any(c.lora_bias for c in configs):
        raise ValueError("add_weighted_adapter does not combine lora_bias=True adapters (their "
                         "lora_B biases have no place in the combined A and B)")
    ranks = [_max_rank(c) for c in configs]
    if combination_type in AB_SPACE and len(set(ranks)) > 1:
        raise ValueError(f"combination_type={combination_type!r} merges A and B entry by entry, so "
                         f"the adapters need one rank; got ranks {ranks}. Use 'cat', or "
                         f"'{'svd' if combination_type == 'linear' else combination_type + '_svd'}'"
                         " which merges the full delta weights")
    if combination_type == "cat":
        rank = sum(ranks)
    elif combination_type in AB_SPACE:
        rank = ranks[0]
    else:
        rank = svd_rank or max(ranks)
    targets = [c.target_modules for c in configs]
    if all(isinstance(t, str) for t in targets):
        merged_targets = "|".join(f"({t})" for t in targets)
    elif any(isinstance(t, str) for t in targets):
        raise ValueError("cannot combine adapters whose target_modules mix names and a regex")
    else:
        merged_targets = sorted(set().union(*targets))
    return dataclasses.replace(configs[0], r=rank, lora_alpha=rank, target_modules=merged_targets,
                               alpha_pattern={}, rank_pattern={})


def _check_modules_to_save(model, adapters) -> None:
    shared = [name for name, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)
              and sum(a in m.modules_to_save for a in adapters) > 1]
    if shared:
        raise ValueError(f"adapters {adapters} each train their own copy of {shared} "
                         "(modules_to_save): full modules cannot be weighted together; combine "
                         "adapters of which at most one has modules_to_save")


def _svd_factors(delta: torch.Tensor, rank: int, clamp: float | None, full_matrices: bool,
                 driver: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    b, a = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank, :]
    if clamp is not None:  # clip outliers at the clamp quantile of all factor entries
        hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
    return a, b


def _combine(layer: LoraLinear, adapters, weights, combination_type, rank, merge_kwargs, svd_kwargs):
    present = [(a, w) for a, w in zip(adapters, weights, strict=True) if a in layer.lora_A]
    if combination_type == "cat":
        a = torch.cat([layer.lora_A[n].weight * w * layer.scaling[n] for n, w in present], dim=0)
        b = torch.cat([layer.lora_B[n].weight for n, _ in present], dim=1)
        return a, b
    if combination_type in AB_SPACE:
        # sqrt of |weight x scaling| on each side, its sign on A only (PEFT's convention)
        scaled = [w * layer.scaling[n] for n, w in present]
        weights_a = [math.copysign(math.sqrt(abs(s)), s) for s in scaled]
        weights_b = [math.sqrt(abs(s)) for s in scaled]
        a = task_merging.merge(combination_type, [layer.lora_A[n].weight for n, _ in present],
                               weights_a, **merge_kwargs)
        b = task_merging.merge(combination_type, [layer.lora_B[n].weight for n, _ in present],
                               weights_b, **merge_kwargs)
        return a, b
    method = "linear" if combination_type == "svd" else combination_type.removesuffix("_svd")
    delta = task_merging.merge(method, [layer.delta_weight(n) for n, _ in present],
                               [w for _, w in present], **merge_kwargs)
    return _svd_factors(delta, rank, **svd_kwargs)


def combine_lora(model, adapters: list[str], weights: list[float], adapter_name: str,
                 combination_type: str, svd_rank: int | None = None, *,
                 svd_clamp: float | None = None, svd_full_matrices: bool = True,
                 svd_driver: str | None = None, density: float | None = None,
                 majority_sign_method: str = "total",
                 generator: torch.Generator | None = None) -> None:
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type must be one of {COMBINATIONS}, got {combination_type!r}")
    unknown = [a for a in adapters if a not in model.peft_config]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; this model has {list(model.peft_config)}")
    if len(weights) != len(adapters):
        raise ValueError(f"give one weight per adapter: {len(adapters)} adapters, "
                         f"{len(weights)} weights")
    if adapter_name in model.peft_config:
        raise ValueError(f"adapter {adapter_name!r} already exists")
    if len(adapters) == 1:  # nothing to prune against or elect: a scaled copy, as in PEFT
        combination_type = "linear"
    task_merging.check_options(combination_type.removesuffix("_svd"), density, majority_sign_method)
    _check_modules_to_save(model, adapters)
    config = _new_config(model, adapters, combination_type, svd_rank)
    merge_kwargs = dict(density=density, majority_sign_method=majority_sign_method,
                        generator=generator)
    svd_kwargs = dict(clamp=svd_clamp, full_matrices=svd_full_matrices, driver=svd_driver)
    model.add_adapter(adapter_name, config)
    try:
        with torch.no_grad():
            for layer in model.modules():
                if isinstance(layer, LoraLinear) and adapter_name in layer.lora_A:
                    layer.lora_A[adapter_name].weight.zero_()
                    layer.lora_B[adapter_name].weight.zero_()
                    if any(a in layer.lora_A for a in adapters):
                        a, b = _combine(layer, adapters, weights, combination_type, config.r,
                                        merge_kwargs, svd_kwargs)
                        layer.lora_A[adapter_name].weight[: a.shape[0]] = a
                        layer.lora_B[adapter_name].weight[:, : b.shape[1]] = b
    except BaseException:
        model.delete_adapter(adapter_name)  # no half-combined adapter left behind
        raise
