"""The rest of the OpenAI surface users drive: ``echo`` and ``best_of`` on completions, vLLM's
``/tokenize`` and ``/detokenize``, and an abort storm of constrained (structured-output)
streams that leaves every KV block free. Through the official client, on a tiny model."""

import json
import time
import urllib.error
import urllib.request

import openai
import pytest

from mlx_serve import LLM
from mlx_serve.server import build_app
from tests.serve.helpers import LiveServer, byte_level_model_dir

MODEL = "tiny-extras"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    directory = byte_level_model_dir(tmp_path_factory.mktemp("extras"))
    llm = LLM(directory, num_blocks=512, block_size=4)
    server = LiveServer(build_app(llm.engine, MODEL))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    yield server, client, llm.engine
    server.stop()


def _post(server, path, body):
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_echo_returns_the_prompt_before_the_completion(served):
    _, client, _ = served
    params = dict(model=MODEL, prompt="The quick brown", max_tokens=6, temperature=0)
    plain = client.completions.create(**params).choices[0].text
    echoed = client.completions.create(**params, echo=True).choices[0].text
    assert echoed == "The quick brown" + plain
    streamed = "".join(c.choices[0].text for c in
                       client.completions.create(**params, echo=True, stream=True) if c.choices)
    assert streamed == echoed


def test_echo_with_logprobs_scores_the_prompt_tokens_too(served):
    """OpenAI's form: the prompt's tokens, the first without a log-probability, then the
    completion's; each prompt token's value is the model's own log-softmax at the position
    before it (to 1e-4)."""
    import torch

    _, client, engine = served
    prompt = "The quick brown fox"
    params = dict(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=2)
    plain = client.completions.create(**params).choices[0].logprobs
    echoed = client.completions.create(**params, echo=True).choices[0]
    ids = engine.tokenizer.encode(prompt)
    n, lp = len(ids), echoed.logprobs
    assert echoed.text.startswith(prompt) and len(lp.tokens) == n + len(plain.tokens)
    assert "".join(lp.tokens[:n]) == prompt and lp.tokens[n:] == plain.tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[n:] == pytest.approx(plain.token_logprobs, abs=1e-5)
    assert lp.text_offset[0] == 0 and lp.text_offset[n] == len(prompt)
    assert lp.text_offset[n + 1] == len(prompt) + len(plain.tokens[0])
    with torch.inference_mode():
        logits = engine.runner.model(torch.tensor([ids]))[0].float()
    reference = torch.log_softmax(logits, -1)
    for p in range(1, n):
        assert lp.token_logprobs[p] == pytest.approx(reference[p - 1, ids[p]].item(), abs=1e-4)
        assert 1 <= len(lp.top_logprobs[p]) <= 2  # two byte tokens may both print as U+FFFD
        assert max(lp.top_logprobs[p].values()) == pytest.approx(
            reference[p - 1].max().item(), abs=1e-4)
    streamed = [c.choices[0].logprobs for c in
                client.completions.create(**params, echo=True, stream=True) if c.choices]
    assert [t for chunk in streamed for t in chunk.tokens] == lp.tokens
    assert [o for chunk in streamed for o in chunk.text_offset] == lp.text_offset
    assert [v for chunk in streamed for v in chunk.token_logprobs][1:] == pytest.approx(
        lp.token_logprobs[1:], abs=1e-5)


def test_best_of_returns_the_most_likely_of_its_candidates(served):
    _, client, _ = served
    params = dict(model=MODEL, prompt="yes no", max_tokens=5, temperature=1.0, seed=7,
                  extra_body={"ignore_eos": True})
    candidates = client.completions.create(**params, n=4, logprobs=0).choices
    scores = {c.text: sum(c.logprobs.token_logprobs) for c in candidates}
    best = client.completions.create(**params, n=2, best_of=4).choices
    assert [c.index for c in best] == [0, 1]
    assert [c.text for c in best] == sorted(scores, key=scores.get, reverse=True)[:2]
    assert best[0].logprobs is None  # not asked for: used for the ranking only
    with pytest.raises(openai.BadRequestError, match=r"best_of \(1\) must be at least n \(2\)"):
        client.completions.create(**params, n=2, best_of=1)
    with pytest.raises(openai.BadRequestError, match="cannot be streamed"):
        client.completions.create(**params, best_of=3, stream=True)


def test_tokenize_and_detokenize(served):
    server, _, engine = served
    status, out = _post(server, "/tokenize", {"model": MODEL, "prompt": "The quick brown"})
    assert status == 200 and out["tokens"] == engine.tokenizer.encode("The quick brown")
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == engine.max_model_len
    status, chat = _post(server, "/tokenize",
                         {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and chat["tokens"] == engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}])
    status, back = _post(server, "/detokenize", {"model": MODEL, "tokens": out["tokens"]})
    assert status == 200 and back["prompt"] == "The quick brown"
    status, bad = _post(server, "/detokenize", {"tokens": [10**6]})
    assert status == 400 and "token ids must be in" in bad["error"]["message"]
    status, both = _post(server, "/tokenize", {"prompt": "a", "messages": [
        {"role": "user", "content": "b"}]})
    assert status == 400 and "a prompt or messages" in both["error"]["message"]
    status, other = _post(server, "/tokenize", {"model": "other", "prompt": "a"})
    assert status == 404


def test_an_abort_storm_of_constrained_streams_leaves_every_block_free(served):
    _, client, engine = served
    schema = {"type": "object", "properties": {"items": {"type": "array",
                                                         "items": {"type": "string"}}}}
    streams = [client.completions.create(model=MODEL, prompt=f"List {i}:", max_tokens=200,
                                         stream=True, extra_body={"guided_json": schema,
                                                                  "ignore_eos": True})
               for i in range(12)]
    for i, stream in enumerate(streams):
        for _, _chunk in zip(range(1 + i % 3), stream, strict=False):
            pass
        stream.close()
    deadline = time.monotonic() + 30
    while engine.requests or engine.blocks.num_free_blocks != engine.blocks.num_blocks:
        assert time.monotonic() < deadline, (len(engine.requests), engine.blocks.num_free_blocks)
        time.sleep(0.05)


def test_max_completion_tokens_and_user_through_the_client(served):
    """Chat's max_completion_tokens (OpenAI's newer name) bounds the answer, and wins over
    max_tokens; ``user`` is accepted (and ignored, as vLLM does)."""
    _, client, _ = served
    params = dict(model=MODEL, messages=[{"role": "user", "content": "count"}], temperature=0,
                  user="alice", extra_body={"ignore_eos": True})
    short = client.chat.completions.create(**params, max_completion_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    both = client.chat.completions.create(**params, max_completion_tokens=2, max_tokens=9)
    assert both.usage.completion_tokens == 2
    completion = client.completions.create(model=MODEL, prompt="count", max_tokens=2, user="bob",
                                           extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 2
