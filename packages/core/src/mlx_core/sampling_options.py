"""The sampling options' valid ranges, checked once (torch-free) for every sampler: the torch
zoo's ``generate``, the serving engine's ``SamplingParams`` and mlx-jax's ``SamplingOptions``."""

from __future__ import annotations


def sampling_problems(temperature: float, top_p: float, min_p: float = 0.0,
                      top_k: int | None = None) -> list[str]:
    """What is wrong with these settings (empty: nothing), each with the valid range. ``top_k``
    None: not checked (the serving API takes any value, <= 0 disabling it, as vLLM's does)."""
    problems = []
    if temperature < 0:
        problems.append(f"temperature must be >= 0 (got {temperature}); 0 means greedy")
    if top_k is not None and top_k < 0:
        problems.append(f"top_k must be >= 0 (got {top_k}); 0 disables it")
    if not 0 < top_p <= 1:
        problems.append(f"top_p must be in (0, 1] (got {top_p}); 1 disables it")
    if not 0 <= min_p <= 1:
        problems.append(f"min_p must be in [0, 1] (got {min_p}); 0 disables it")
    return problems
