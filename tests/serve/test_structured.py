"""Structured outputs (``SamplingParams.guided_decoding``; the server's ``response_format`` and
vLLM's ``guided_*`` extras) through llguidance: every constrained output is what its JSON schema,
choice list, regex or grammar allows, sampled or greedy, n > 1 included; constrained and free
requests share batches without changing the free ones; the official client's ``parse`` returns
the Pydantic object; a constraint that does not compile is a 400 before any work.

The model is a random tiny Llama with a byte-level BPE tokenizer (``helpers.byte_level_model_dir``:
the tokenizer kind real models use, whose tokens llguidance reads as bytes). Its outputs are random, so the
constraints used here bound the output's length: whatever it samples, it finishes."""

import json
import re
from typing import Literal

import openai
import pytest
from pydantic import BaseModel

from mlx_serve import LLM, SamplingParams
from mlx_serve.server import build_app
from mlx_serve.structured import GuidedDecodingParams
from tests.serve.helpers import LiveServer, byte_level_model_dir

MODEL = "tiny-structured"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["color", "ok"],
          "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}}}


class Answer(BaseModel):
    color: Literal["red", "green", "blue"]
    ok: bool


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return byte_level_model_dir(tmp_path_factory.mktemp("structured"))


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, num_blocks=128, block_size=4)


def _texts(llm, prompt, guided, n=4, temperature=1.0, max_tokens=48, seed=0):
    params = SamplingParams(n=n, temperature=temperature, seed=seed, max_tokens=max_tokens,
                            guided_decoding=guided)
    outs = llm.generate([prompt], params)[0].outputs
    assert all(o.finish_reason == "stop" for o in outs), [(o.text, o.finish_reason) for o in outs]
    return [o.text for o in outs]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_outputs_validate(llm, temperature):
    for seed in range(3):
        for text in _texts(llm, "Answer:", {"json": SCHEMA}, temperature=temperature, seed=seed):
            Answer.model_validate_json(text)
            assert set(json.loads(text)) == {"color", "ok"}


def test_choice_regex_and_grammar_outputs_match(llm):
    choices = ["yes", "no", "maybe not"]
    assert set(_texts(llm, "Well?", {"choice": choices}, n=8)) <= set(choices)
    phone = r"\(\d{3}\) \d{3}-\d{4}"
    assert all(re.fullmatch(phone, t) for t in _texts(llm, "Call", {"regex": phone}))
    lark = 'start: "(" DIGIT ("+" DIGIT)? ")"\nDIGIT: /[0-9]/'
    assert all(re.fullmatch(r"\(\d(\+\d)?\)", t) for t in _texts(llm, "Sum", {"grammar": lark}))
    gbnf = 'root ::= "on" | "off"'
    assert set(_texts(llm, "Switch", {"grammar": gbnf})) <= {"on", "off"}


def test_constrained_and_free_requests_share_a_batch(llm):
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(["The quick brown"], free)[0].outputs[0].token_ids
    guided = SamplingParams(temperature=0, max_tokens=48, guided_decoding={"json": SCHEMA})
    both = llm.generate(["The quick brown", "Answer:"], [free, guided])
    assert both[0].outputs[0].token_ids == alone
    Answer.model_validate_json(both[1].outputs[0].text)


def test_bad_constraints_fail_before_any_work(llm):
    with pytest.raises(ValueError, match="give exactly one of json, json_object, regex, choice"):
        GuidedDecodingParams(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="(?s)invalid structured-output constraint.*unclosed group"):
        llm.generate(["x"], SamplingParams(guided_decoding={"regex": "(unclosed"}))
    with pytest.raises(ValueError, match="invalid structured-output constraint"):
        llm.generate(["x"], SamplingParams(guided_decoding={"grammar": "start: undefined_rule"}))
    # GBNF that llguidance's reader rejects with plain Exceptions (the server fuzzing found the
    # first: it stopped the engine thread)
    for grammar, message in [('greeting ::= "hi"', "No 'root' rule"), ("a ::= b ::=", "Expected")]:
        with pytest.raises(ValueError, match=f"invalid structured-output constraint.*{message}"):
            llm.generate(["x"], SamplingParams(guided_decoding={"grammar": grammar}))
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


@pytest.fixture(scope="module")
def client(model_dir):
    served = LLM(model_dir, num_blocks=128, block_size=4)
    server = LiveServer(build_app(served.engine, MODEL))
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    server.stop()


def test_official_client_parse_returns_the_pydantic_object(client):
    for seed in range(4):
        reply = client.beta.chat.completions.parse(
            model=MODEL, messages=[{"role": "user", "content": "Pick a colour."}],
            response_format=Answer, max_tokens=48, temperature=1.0, seed=seed)
        assert isinstance(reply.choices[0].message.parsed, Answer)
        assert reply.choices[0].finish_reason == "stop"


def test_guided_extras_streamed_and_not(client):
    body = {"guided_choice": ["alpha", "beta", "gamma delta"]}
    params = dict(model=MODEL, prompt="Pick:", max_tokens=16, temperature=0, extra_body=body)
    whole = client.completions.create(**params).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(**params, stream=True)
                       if c.choices)
    assert whole == streamed and whole in body["guided_choice"]
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Digits?"}], max_tokens=16,
        extra_body={"guided_regex": r"[0-9]{4}"})
    assert re.fullmatch(r"[0-9]{4}", reply.choices[0].message.content)


def test_bad_constraints_are_400s(client):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError, match="unclosed group"):
        client.chat.completions.create(model=MODEL, messages=messages,
                                       extra_body={"guided_regex": "(unclosed"})
    with pytest.raises(openai.BadRequestError, match="No 'root' rule"):
        client.chat.completions.create(model=MODEL, messages=messages,
                                       extra_body={"guided_grammar": 'greeting ::= "hi"'})
    assert client.with_options(max_retries=0).models.list().data  # the engine still serves
    with pytest.raises(openai.BadRequestError, match="give one output constraint"):
        client.chat.completions.create(model=MODEL, messages=messages,
                                       response_format={"type": "json_object"},
                                       extra_body={"guided_choice": ["a"]})
    with pytest.raises(openai.BadRequestError, match="needs json_schema.schema"):
        client.chat.completions.create(model=MODEL, messages=messages,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x"}})


class Person(BaseModel):
    name: str
    age: int
    city: str


@pytest.mark.builtin_model
@pytest.mark.slow
def test_builtin_model_parses_20_of_20_through_the_official_client():
    """The issue's check: ``parse`` with a Pydantic model on the built-in model, 20 different
    prompts (sent at once: the engine batches them), 20 valid objects."""
    from concurrent.futures import ThreadPoolExecutor

    llm = LLM("smollm2-135m-instruct", kv_cache_memory="512MiB")
    server = LiveServer(build_app(llm.engine, "smollm2"))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
    jobs = ["a pilot", "a baker", "a painter", "a doctor", "a farmer", "a teacher", "a sailor",
            "a poet", "a chef", "a nurse", "a miner", "a singer", "a judge", "a tailor", "a coach",
            "a writer", "an actor", "an architect", "an engineer", "a gardener"]

    def ask(job):
        return client.beta.chat.completions.parse(
            model="smollm2", response_format=Person, max_tokens=64, temperature=0,
            messages=[{"role": "user", "content": f"Invent {job}: their name, age and city."}])

    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            replies = list(pool.map(ask, jobs))
    finally:
        server.stop()
    people = [r.choices[0].message.parsed for r in replies]
    assert sum(isinstance(p, Person) for p in people) == 20, people


def test_jump_forward_appends_forced_tokens_without_a_step_each(model_dir):
    """Tokens the grammar forces (the keys, quotes, colons) are appended at once and computed in
    the next step as a chunk: the same JSON, fewer steps."""
    runs = {}
    for jump in (False, True):
        llm = LLM(model_dir, num_blocks=128, block_size=4, jump_forward=jump)
        step, steps = llm.engine.step, []
        llm.engine.step = lambda step=step, steps=steps: steps.append(1) or step()
        params = SamplingParams(temperature=0, max_tokens=64, guided_decoding={"json": SCHEMA})
        out = llm.generate(["Answer:"], params)[0].outputs[0]
        runs[jump] = (out.text, len(steps), llm.engine.num_forced_tokens)
    Answer.model_validate_json(runs[True][0])
    assert runs[True][0] == runs[False][0]
    assert runs[True][2] > 0 and runs[False][2] == 0
    assert runs[True][1] < runs[False][1]


def test_logprobs_stay_one_per_token_under_a_grammar(llm):
    """A request that asks for logprobs draws every token (no jump-forward), so each output token
    has its entry."""
    params = SamplingParams(temperature=0, max_tokens=64, logprobs=2, guided_decoding={"json": SCHEMA})
    out = llm.generate(["Answer:"], params)[0].outputs[0]
    Answer.model_validate_json(out.text)
    assert len(out.logprobs) == len(out.token_ids)
