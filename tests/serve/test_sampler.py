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
        assert [t.token_id for [t] in sampler(logits, [_seq(**params) for _ in range(3)])] == best


def test_draws_follow_the_filtered_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05] + [1e-9] * (V - 4)]))
    sampler = Sampler(eos_token_ids=[], seed=0)
    draws = 4000
    counts = torch.zeros(V)
    seqs = [_seq(temperature=1.0, top_k=3)]
    for _ in range(draws):
        counts[sampler(logits, seqs)[0][0].token_id] += 1
    target = torch.tensor([0.5, 0.3, 0.15]) / 0.95
    freq = counts[:3] / draws
    assert counts[3:].sum() == 0  # top_k=3 removed the rest
    assert ((freq - target).abs() < 4 * (target * (1 - target) / draws).sqrt()).all(), freq


def test_a_seeded_request_samples_the_same_whatever_shares_its_batch():
    sampler = Sampler(eos_token_ids=[], seed=0)
    lone = _seq(seed=7)
    alone = [sampler(_logits(1, s), [lone])[0][0].token_id for s in range(20)]
    mine = _seq(seed=7)
    shared = [sampler(torch.cat([_logits(1, 100 + s), _logits(1, s)]), [_seq(), mine])[1][0].token_id
              for s in range(20)]
    assert alone == shared
    assert len(set(alone)) > 1  # it did sample


def test_logprobs_are_the_raw_distribution_and_min_tokens_masks_eos():
    logits = _logits(1)
    raw = torch.log_softmax(logits, -1)[0]
    out = Sampler(eos_token_ids=[], seed=0)(logits, [_seq(temperature=0, logprobs=3,
                                                          repetition_penalty=2.0)])[0][0]
    assert out.logprob == pytest.approx(float(raw[out.token_id]), abs=1e-6)
    top = raw.topk(3)
    assert out.top_logprobs == pytest.approx(dict(zip(top.indices.tolist(), top.values.tolist(),
                                                      strict=True)), abs=1e-6)
    eos = int(logits.argmax())
    held = Sampler(eos_token_ids=[eos])(logits, [_seq(temperature=0, min_tokens=2, max_tokens=5)])
    assert held[0][0].token_id != eos


def _drafted(drafts, **options):
    seq = _seq(**options)
    seq.draft_token_ids = list(drafts)
    return seq


def test_greedy_drafts_are_kept_while_they_equal_the_argmax_then_one_token_follows():
    logits = _logits(4)
    best = logits.argmax(-1).tolist()
    sampler = Sampler(eos_token_ids=[], seed=0)
    all_kept = sampler(logits, [_drafted(best[:3], temperature=0)])[0]
    assert [t.token_id for t in all_kept] == best  # 3 drafts kept, the 4th row's token after
    wrong = (best[1] + 1) % V
    cut = sampler(logits, [_drafted([best[0], wrong, best[2]], temperature=0)])[0]
    assert [t.token_id for t in cut] == best[:2]  # the second row's own token replaces the draft


def test_a_draft_row_sees_the_drafts_before_it_as_tokens():
    logits = _logits(2)
    draft = int(logits[0].argmax())
    logits[1, draft] = logits[1].max() + 1.0  # the draft would be chosen again, but for penalties
    options = dict(temperature=0, repetition_penalty=50.0, frequency_penalty=1.0, logprobs=2)
    sampler = Sampler(eos_token_ids=[], seed=0)
    drafted = sampler(logits, [_drafted([draft], **options)])[0]
    undrafted = _seq(output=[draft], **options)  # the same sequence once the draft was its token
    step_two = sampler(logits[1:], [undrafted])[0][0]
    assert [t.token_id for t in drafted] == [draft, step_two.token_id] and step_two.token_id != draft
    raw = torch.log_softmax(logits, -1)
    assert [t.logprob for t in drafted] == pytest.approx([float(raw[0, draft]),
                                                          float(raw[1, step_two.token_id])], abs=1e-6)


def test_sampled_drafts_keep_the_model_distribution():
    """A drafted position draws what an undrafted one would; the draft is kept with p(draft)."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05] + [0.0] * (V - 4))
    logits = torch.log(probs.clamp_min(1e-12)).repeat(2, 1)
    sampler = Sampler(eos_token_ids=[], seed=1)
    draws = 4000
    first, kept = torch.zeros(V), 0
    for _ in range(draws):
        tokens = sampler(logits, [_drafted([1], temperature=1.0)])[0]
        first[tokens[0].token_id] += 1
        kept += len(tokens) == 2
    freq = first / draws
    bound = 4 * (probs * (1 - probs) / draws).sqrt()
    assert ((freq - probs).abs() <= bound + 1e-9).all(), freq[:4]
    assert abs(kept / draws - 0.3) < 4 * (0.3 * 0.7 / draws) ** 0.5


def test_a_seeded_token_is_the_same_drafted_or_not():
    sampler = Sampler(eos_token_ids=[], seed=0)
    for s in range(20):
        logits = _logits(2, s) / 3  # flatter: drafts are kept only some of the time
        plain = sampler(logits[:1], [_seq(seed=7, temperature=1.0)])[0][0].token_id
        draft = (plain + s % 2) % V  # right half the time
        drafted = sampler(logits, [_drafted([draft], seed=7, temperature=1.0)])[0]
        assert drafted[0].token_id == plain
        if draft == plain:  # kept: the next token is the undrafted draw at output index 1
            after = sampler(logits[1:], [_seq(seed=7, temperature=1.0, output=[plain])])[0][0]
            assert [t.token_id for t in drafted] == [plain, after.token_id]
        else:
            assert len(drafted) == 1


def test_bad_sampling_params_name_the_problem():
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_tokens must be >= 1.*temperature must be >= 0|"
                                         "temperature must be >= 0.*max_tokens must be >= 1"):
        SamplingParams(max_tokens=0, temperature=-1)
