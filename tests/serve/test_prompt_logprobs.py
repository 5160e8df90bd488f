"""``SamplingParams.prompt_logprobs``: the engine's log-probabilities of prompt tokens equal a
full forward's, with chunked prefill and preemption too; a context shared by several scored
continuations comes from the prefix cache up to the first scored position, never past it."""

import pytest
import torch

from mlx_core import build_model, get_preset
from mlx_serve import LLM, SamplingParams


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = build_model(get_preset("tiny-llama")).eval()
    model.reset_parameters(std=0.1)  # peaked distributions: wrong positions would show
    return model


def _reference(model, ids):
    """Per position p >= 1: log p(ids[p] | ids[:p]) from one plain forward."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)
    return [None] + [float(logprobs[p - 1, ids[p]]) for p in range(1, len(ids))]


def _score(llm, prompts, start=1, k=0):
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=k,
                            prompt_logprobs_start=start)
    return llm.generate(prompts, params)


@pytest.mark.parametrize("options", [{}, dict(max_num_batched_tokens=5),
                                     dict(num_blocks=6, block_size=4)],
                         ids=["default", "chunked-prefill", "preemption"])
def test_prompt_logprobs_equal_a_full_forward(model, options):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (9, 2, 17)]
    llm = LLM(model, **options)
    for out in _score(llm, prompts, k=2):
        ref = _reference(model, out.prompt_token_ids)
        assert out.prompt_logprobs[0] is None
        for p in range(1, len(ref)):
            entry = out.prompt_logprobs[p]
            assert entry[out.prompt_token_ids[p]] == pytest.approx(ref[p], abs=1e-5)
            assert len(entry) in (2, 3)  # the token, and the top 2 (it may be one of them)
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def test_a_shared_context_is_cached_up_to_the_first_scored_position(model):
    context = list(range(10, 30))  # 20 tokens: with blocks of 4, five full blocks
    choices = [[40, 41], [50], [60, 61, 62]]
    llm = LLM(model, block_size=4)
    first = _score(llm, [context + choices[0]], start=len(context))[0]
    rest = _score(llm, [context + c for c in choices[1:]], start=len(context))
    for out in [first, *rest]:
        ref = _reference(model, out.prompt_token_ids)
        assert out.prompt_logprobs[:len(context)] == [None] * len(context)
        for p in range(len(context), len(ref)):
            assert out.prompt_logprobs[p][out.prompt_token_ids[p]] == pytest.approx(ref[p],
                                                                                    abs=1e-5)
    assert first.metrics.num_cached_tokens == 0
    # the context's last token is computed again: its logits score the first choice token
    assert [o.metrics.num_cached_tokens for o in rest] == [len(context) - 1] * 2


def test_bad_prompt_logprob_requests_fail_clearly(model):
    llm = LLM(model)
    with pytest.raises(ValueError, match="prompt_logprobs_start=5 is past the prompt's last"):
        _score(llm, [[1, 2, 3]], start=5)
    with pytest.raises(ValueError, match="prompt_logprobs_start must be >= 1"):
        SamplingParams(prompt_logprobs=0, prompt_logprobs_start=0)
    with pytest.raises(ValueError, match="prompt_logprobs must be >= 0"):
        SamplingParams(prompt_logprobs=-1)
