"""The sampling filters (``mlx_core.models.sampling``) against HF's logits warpers: each row of a
batch filtered with its own settings equals HF's warpers applied to that row alone, -inf pattern
and values exactly (the same fp32 arithmetic, ``1 - top_p`` rounded from double as HF's is)."""

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mlx_core.models.sampling import filter_logits
from mlx_core.sampling_options import sampling_problems

# (temperature, top_k, top_p, min_p) per row; 0 / 1.0 / 0.0 switch a filter off
ROWS = [(1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.3, 0, 0.9, 0.0), (0.5, 0, 0.0001, 0.0),
        (1.0, 0, 1.0, 0.05), (0.8, 40, 0.95, 0.02), (1.0, 1000, 0.5, 0.0), (2.0, 3, 0.99, 0.3)]


def _hf(row: torch.Tensor, temperature, top_k, top_p, min_p) -> torch.Tensor:
    ids, scores = torch.zeros(1, 1, dtype=torch.long), row[None].clone()
    warpers = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(top_k)] if top_k > 0 else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    warpers += [MinPLogitsWarper(min_p)] if min_p > 0 else []
    for warp in warpers:
        scores = warp(ids, scores)
    return scores[0]


@pytest.mark.hf_parity
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_row_equals_hf_warpers(seed):
    logits = torch.randn(len(ROWS), 1000, generator=torch.Generator().manual_seed(seed)) * 3
    got = filter_logits(logits, *(list(column) for column in zip(*ROWS, strict=True)))
    for i, settings in enumerate(ROWS):
        assert torch.equal(got[i], _hf(logits[i], *settings)), settings


@pytest.mark.hf_parity
def test_one_setting_for_every_row_and_ties_at_the_top_p_boundary():
    # probabilities 0.5, 0.25, 0.125, ...: the cumulative mass lands exactly on 1 - top_p
    logits = torch.log(torch.tensor([[2.0 ** -i for i in range(1, 12)]] * 2))
    for top_p in (0.5, 0.75, 0.875):
        got = filter_logits(logits, 1.0, 0, top_p)
        assert torch.equal(got[1], _hf(logits[1], 1.0, 0, top_p, 0.0))


def test_settings_problems_name_the_valid_range():
    assert sampling_problems(0.7, 0.9, 0.1) == []
    assert sampling_problems(-1, 0, 2) == [
        "temperature must be >= 0 (got -1); 0 means greedy",
        "top_p must be in (0, 1] (got 0); 1 disables it",
        "min_p must be in [0, 1] (got 2); 0 disables it"]
