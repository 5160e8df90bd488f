"""Merging task tensors (several adapters' A, B or delta weights) into one: task arithmetic,
TIES (trim, elect sign, disjoint merge; Yadav et al. 2023), DARE (random drop and rescale;
Yu et al. 2023) and magnitude pruning, with PEFT's definitions so a merge here equals PEFT's.

DARE's random masks come from ``torch.bernoulli`` on the global generator, drawn in the same
order as PEFT, so after the same ``torch.manual_seed`` both give the same adapter; pass
``generator`` to leave the global one untouched.
"""

from __future__ import annotations

import torch

# method -> (how each tensor is pruned first, whether signs are elected)
METHODS = {
    "linear": (None, False),
    "magnitude_prune": ("magnitude", False),
    "ties": ("magnitude", True),
    "dare_linear": ("random", False),
    "dare_ties": ("random", True),
}
SIGN_METHODS = ("total", "frequency")


def check_options(method: str, density: float | None, majority_sign_method: str) -> None:
    """Raise, naming the fix, on options ``merge(method, ...)`` cannot use (``method`` may be
    one that does not prune: then ``density`` is not needed)."""
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, "
                         f"got {majority_sign_method!r}")
    if METHODS.get(method, (None,))[0] is None:
        return
    if density is None or not 0.0 <= density <= 1.0:
        raise ValueError(f"combination_type={method!r} prunes each adapter: pass density, the share "
                         f"of values kept, in [0, 1] (e.g. density=0.5); got {density!r}")


def prune(tensor: torch.Tensor, density: float, how: str,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep the ``density`` share of ``tensor``: its largest magnitudes, or a random draw
    rescaled by ``1 / density`` (DARE) so the expected value is unchanged."""
    if density >= 1.0:  # PEFT keeps everything and draws no random numbers
        return tensor
    if how == "magnitude":
        keep = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
        keep[tensor.abs().reshape(-1).topk(int(density * tensor.numel())).indices] = 1
        return tensor * keep.reshape(tensor.shape)
    keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * keep / density


def majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Where each task's sign agrees with the elected one: the sign of the summed values
    (``total``) or of the summed signs (``frequency``); ties elect +."""
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(votes >= 0, 1, -1)


def merge(method: str, tensors: list[torch.Tensor], weights: list[float], *,
          density: float | None = None, majority_sign_method: str = "total",
          generator: torch.Generator | None = None) -> torch.Tensor:
    """``sum_i w_i * prune(t_i)``, or for the TIES variants the mean over the tasks that agree
    with the elected sign (each entry divided by how many agree, at least 1)."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {sorted(METHODS)}")
    check_options(method, density, majority_sign_method)
    how, elect_sign = METHODS[method]
    if how is not None:
        tensors = [prune(t, density, how, generator) for t in tensors]
    stacked = torch.stack(tensors)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    weighted = stacked * w.view(-1, *([1] * (stacked.dim() - 1)))
    if not elect_sign:
        return weighted.sum(dim=0)
    agree = majority_sign_mask(stacked, majority_sign_method)
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1.0)
