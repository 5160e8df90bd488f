"""The sampler against HF transformers' logits processors and against the distributions it
draws from. Tolerances: filtered logits equal HF's exactly (same -inf set, values 1e-6);
empirical frequencies within 4 standard errors of the target probabilities."""

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mlx_serve.sampler import Sampler, _filter, apply_penalties
from mlx_serve.sampling_params import SamplingParams
from mlx_serve.sequence import Sequence

V = 50


def _seq(seed=None, prompt=(1, 2, 3), output=(), **params):
    seq = Sequence("r", list(prompt), SamplingParams(**params), seed=seed)
    seq.output_token_ids = list(output)
    return seq


def _logits(rows=3, seed=0):
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("options", [dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8),
                                     dict(temperature=1.0, min_p=0.1),
                                     dict(temperature=0.5, top_k=10, top_p=0.9, min_p=0.05)])
def test_filters_equal_hf_logits_warpers(options):
    logits = _logits()
    ours = _filter(logits.clone(), [_seq(**options)] * 3)
    ref = TemperatureLogitsWarper(options["temperature"])(None, logits.clone())
    if options.get("top_k"):
        ref = TopKLogitsWarper(options["top_k"])(None, ref)
    if options.get("top_p"):
        ref = TopPLogitsWarper(options["top_p"])(None, ref)
    if options.get("min_p"):
        ref = MinPLogitsWarper(options["min_p"])(None, ref)
    assert torch.equal(ours.isinf(), ref.isinf())
    torch.testing.assert_close(ours[~ours.isinf()], ref[~ref.isinf()], atol=1e-6, rtol=0)


def test_rows_keep_their_own_settings():
    logits = _logits(2)
    out = _filter(logits.clone(), [_seq(top_k=3), _seq(top_p=1.0)])
    assert int((~out[0].isinf()).sum()) == 3 and not out[1].isinf().any()


def test_repetition_penalty_equals_hf_and_openai_penalties_count_output_tokens():
    logits = _logits(1)
    seq = _seq(prompt=[1, 2, 3], output=[3, 7, 7], repetition_penalty=1.3)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([[1, 2, 3, 3, 7, 7]]), logits.clone())
    torch.testing.assert_close(apply_penalties(logits.clone(), [seq]), ref)
    seq = _seq(prompt=[1, 2], output=[3, 7, 7], frequency_penalty=0.5, presence_penalty=0.25)
    out = apply_penalties(logits.clone(), [seq])
    expected = logits.clone()
    expected[0, 3] -= 0.5 + 0.25
    expected[0, 7] -= 2 * 0.5 + 0.25
    torch.testing.assert_close(out, expected)


def test_greedy_and_degenerate_filters_pick_the_argmax():
    logits = _logits()
    best = logits.argmax(-1).tolist()
    sampler = Sampler(eos_token_ids=[], seed=0)
    for params in (dict(temperature=0), dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        assert [t.token_id for t in sampler(logits, [_seq(**params) for _ in range(3)])] == best


def test_draws_follow_the_filtered_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05] + [1e-9] * (V - 4)]))
    sampler = Sampler(eos_token_ids=[], seed=0)
    draws = 4000
    counts = torch.zeros(V)
    seqs = [_seq(temperature=1.0, top_k=3)]
    for _ in range(draws):
        counts[sampler(logits, seqs)[0].token_id] += 1
    target = torch.tensor([0.5, 0.3, 0.15]) / 0.95
    freq = counts[:3] / draws
    assert counts[3:].sum() == 0  # top_k=3 removed the rest
    assert ((freq - target).abs() < 4 * (target * (1 - target) / draws).sqrt()).all(), freq


def test_a_seeded_request_samples_the_same_whatever_shares_its_batch():
    sampler = Sampler(eos_token_ids=[], seed=0)
    lone = _seq(seed=7)
    alone = [sampler(_logits(1, s), [lone])[0].token_id for s in range(20)]
    mine = _seq(seed=7)
    shared = [sampler(torch.cat([_logits(1, 100 + s), _logits(1, s)]), [_seq(), mine])[1].token_id
              for s in range(20)]
    assert alone == shared
    assert len(set(alone)) > 1  # it did sample


def test_logprobs_are_the_raw_distribution_and_min_tokens_masks_eos():
    logits = _logits(1)
    raw = torch.log_softmax(logits, -1)[0]
    out = Sampler(eos_token_ids=[], seed=0)(logits, [_seq(temperature=0, logprobs=3,
                                                          repetition_penalty=2.0)])[0]
    assert out.logprob == pytest.approx(float(raw[out.token_id]), abs=1e-6)
    top = raw.topk(3)
    assert out.top_logprobs == pytest.approx(dict(zip(top.indices.tolist(), top.values.tolist(),
                                                      strict=True)), abs=1e-6)
    eos = int(logits.argmax())
    held = Sampler(eos_token_ids=[eos])(logits, [_seq(temperature=0, min_tokens=2, max_tokens=5)])
    assert held[0].token_id != eos


def test_bad_sampling_params_name_the_problem():
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_tokens must be >= 1.*temperature must be >= 0|"
                                         "temperature must be >= 0.*max_tokens must be >= 1"):
        SamplingParams(max_tokens=0, temperature=-1)
