"""The OpenAI-compatible server, run for real (uvicorn on a free port) over a tiny model and
driven with the official ``openai`` client: completions and chat, streamed and not, n, stop,
seeds, logprobs, usage, models, health, metrics, the API key, OpenAI-shaped errors, and clients
that disconnect (their requests are aborted and every KV block is free afterwards)."""

import json
import re
import socket
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch

from mlx_serve import LLM, SamplingParams
from mlx_serve.server import build_app
from tests.serve.helpers import LiveServer

MODEL, KEY = "tiny-served", "test-key"
PROMPT = "hello there w5 w9 w17"
REPEATS = [5, 9, 17, 3, 4]  # token ids whose greedy continuation repeats itself here
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there w3"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_tokenizer):
    from mlx_core import build_model, get_preset, save_model

    torch.manual_seed(0)
    model = build_model(get_preset("tiny-llama"))
    model.reset_parameters(std=0.2)  # peaked distributions: greedy text is not all one token
    directory = save_model(model, tmp_path_factory.mktemp("tiny") / "m", tokenizer=tiny_tokenizer)
    llm = LLM(directory, num_blocks=64, block_size=4)
    app = build_app(llm.engine, MODEL, api_key=KEY)
    server = LiveServer(app)
    yield server, app, directory
    server.stop()


@pytest.fixture
def client(served):
    server, _, _ = served
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def _get(served, path, headers=None):
    request = urllib.request.Request(served[0].url + path, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _metrics(served) -> dict[str, float]:
    status, text = _get(served, "/metrics")
    assert status == 200
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


def _wait_all_blocks_free(served, aborts_at_least=0, timeout=10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = _metrics(served)
        aborts = m.get('mlx_serve_requests_finished_total{finish_reason="abort"}', 0)
        if (m["mlx_serve_kv_blocks_free"] == m["mlx_serve_kv_blocks_total"]
                and m["mlx_serve_num_seqs_running"] == m["mlx_serve_num_seqs_waiting"] == 0
                and aborts >= aborts_at_least):
            return m
        assert time.monotonic() < deadline, f"blocks still held or not aborted: {m}"
        time.sleep(0.05)


def _greedy(**extra):
    return dict(model=MODEL, temperature=0, max_tokens=12, extra_body={"ignore_eos": True,
                                                                       **extra})


def test_models_health_and_api_key(served, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert _get(served, "/health") == (200, '{"status":"ok"}')
    status, body = _get(served, "/v1/models")  # no key
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=served[0].url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model=MODEL, prompt=PROMPT)
    assert e.value.status_code == 401
    assert set(e.value.response.json()["error"]) == {"message", "type", "param", "code"}


def test_completion_equals_offline_engine_and_streams_the_same_text(served, client):
    _, _, directory = served
    offline = LLM(directory, num_blocks=64, block_size=4).generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    done = client.completions.create(prompt=PROMPT, **_greedy())
    assert done.object == "text_completion" and len(done.choices) == 1
    assert done.choices[0].text == offline.outputs[0].text and done.choices[0].text.strip()
    assert done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 12
    assert done.usage.prompt_tokens == len(offline.prompt_token_ids)
    assert done.usage.total_tokens == done.usage.prompt_tokens + 12

    chunks = list(client.completions.create(prompt=PROMPT, stream=True,
                                            stream_options={"include_usage": True}, **_greedy()))
    assert len(chunks) > 3  # it really streamed
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and _counts(chunks[-1].usage) == _counts(done.usage)
    # the same prompt again: all of it but its last token came from the prefix cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == done.usage.prompt_tokens - 1


def _counts(usage):
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


def test_chat_streamed_equals_not_streamed(client):
    done = client.chat.completions.create(messages=MESSAGES, **_greedy())
    assert done.object == "chat.completion"
    message = done.choices[0].message
    assert message.role == "assistant" and message.content.strip()
    assert done.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True},
                                                 **_greedy()))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == message.content
    assert _counts(chunks[-1].usage) == _counts(done.usage)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == done.usage.prompt_tokens - 1


def test_several_prompts_and_token_id_prompts(client):
    single = client.completions.create(prompt=PROMPT, **_greedy())
    ids = [1, 7, 8, 5]
    from_ids = client.completions.create(prompt=ids, **_greedy())
    both = client.completions.create(prompt=[PROMPT, "hi w3"], n=2, **_greedy())
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert both.choices[0].text == both.choices[1].text == single.choices[0].text
    assert both.choices[2].text != single.choices[0].text
    assert both.usage.completion_tokens == 4 * 12
    assert from_ids.usage.prompt_tokens == len(ids)
    streamed = {}
    for chunk in client.completions.create(prompt=[PROMPT, "hi w3"], stream=True, **_greedy()):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {0: both.choices[0].text, 1: both.choices[2].text}


@pytest.mark.parametrize("spans_tokens", [False, True])
def test_stop_strings_cut_the_text_streamed_or_not(client, spans_tokens):
    free = client.completions.create(prompt=PROMPT, **_greedy()).choices[0].text
    words = free.split()
    mid = len(words) // 2
    # a whole word, or the end of one word and the start of the next: streaming must hold text
    # back, or it would send the first token's characters before the stop is complete
    stop = f"{words[mid][-1]} {words[mid + 1][0]}" if spans_tokens else words[mid]
    cut = free[:free.index(stop)]
    done = client.completions.create(prompt=PROMPT, stop=[stop], **_greedy())
    assert done.choices[0].text == cut and done.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(prompt=PROMPT, stop=[stop], stream=True, **_greedy()))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_and_seed_reproducibility(client):
    def sample(seed, **kw):
        out = client.completions.create(model=MODEL, prompt=PROMPT, n=2, seed=seed,
                                        temperature=1.0, max_tokens=16,
                                        extra_body={"ignore_eos": True}, **kw)
        return out

    first = sample(7)
    assert [c.index for c in first.choices] == [0, 1]
    texts = [c.text for c in first.choices]
    assert texts[0] != texts[1]  # two samples, not one copied
    assert [c.text for c in sample(7).choices] == texts
    assert [c.text for c in sample(8).choices] != texts
    assert first.usage.completion_tokens == 32
    streamed = {}
    for chunk in sample(7, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[0], streamed[1]] == texts


def test_logprobs(client):
    done = client.completions.create(prompt=PROMPT, logprobs=3, **_greedy())
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12
    for chosen, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and value <= 0
        assert value == pytest.approx(max(top.values()))  # greedy takes the most likely
        assert top[chosen] == pytest.approx(value)
    chat = client.chat.completions.create(messages=MESSAGES, logprobs=True, top_logprobs=2,
                                          **_greedy())
    content = chat.choices[0].logprobs.content
    assert len(content) == 12 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)


@pytest.mark.parametrize("kind, request_kw, param", [
    ("completion", dict(temperature=3.0), "temperature"),
    ("completion", dict(max_tokens=10_000), "max_tokens"),
    ("completion", dict(extra_body={"top_p": 0}), "top_p"),
    ("chat", dict(messages=[{"role": "wizard", "content": "hi"}]), None),
    ("chat", dict(messages=MESSAGES, top_logprobs=2), "top_logprobs"),
])
def test_bad_requests_get_400_with_the_openai_error_object(client, kind, request_kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        if kind == "completion":
            client.completions.create(**{"model": MODEL, "prompt": PROMPT, **request_kw})
        else:
            client.chat.completions.create(**{"model": MODEL, **request_kw})
    error = e.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    if param:
        assert error["param"] == param, error


def test_unknown_model_404_and_malformed_json_400(served, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt=PROMPT)
    assert e.value.response.json()["error"]["param"] == "model"
    request = urllib.request.Request(served[0].url + "/v1/completions", data=b"{not json",
                                     headers={"Authorization": f"Bearer {KEY}",
                                              "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 400 and "Traceback" not in (body := e.value.read().decode())
    assert json.loads(body)["error"]["type"] == "invalid_request_error"


def test_metrics_after_requests_show_all_blocks_free(served, client):
    client.completions.create(prompt=PROMPT, **_greedy())
    m = _wait_all_blocks_free(served)
    assert m["mlx_serve_kv_blocks_total"] == 64 and m["mlx_serve_kv_blocks_used"] == 0
    assert m["mlx_serve_generation_tokens_total"] >= 12
    assert m["mlx_serve_prompt_tokens_total"] > 0
    assert m["mlx_serve_time_to_first_token_seconds_count"] >= 1
    assert m["mlx_serve_time_per_output_token_seconds_count"] >= 1
    assert m['mlx_serve_requests_finished_total{finish_reason="length"}'] >= 1
    assert 0 <= m["mlx_serve_prefix_cache_hit_rate"] <= 1
    assert "mlx_serve_preemptions_total" in m
    assert m["mlx_serve_spec_decode_num_draft_tokens_total"] == 0  # no speculative_config


def _aborts(served) -> float:
    return _metrics(served).get('mlx_serve_requests_finished_total{finish_reason="abort"}', 0)


def test_streaming_client_that_disconnects_is_aborted(served, client):
    before = _aborts(served)
    stream = client.completions.create(model=MODEL, prompt=PROMPT, stream=True, max_tokens=200,
                                       temperature=0, extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(2), stream, strict=False):
        pass
    stream.close()
    _wait_all_blocks_free(served, aborts_at_least=before + 1)


def test_non_streaming_client_that_disconnects_is_aborted(served):
    before = _aborts(served)
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 200, "temperature": 0,
                       "ignore_eos": True}).encode()
    host, port = served[0].url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nAuthorization: Bearer " + KEY.encode()
                     + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 10  # wait until it runs, then hang up
        while _metrics(served)["mlx_serve_kv_blocks_used"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    _wait_all_blocks_free(served, aborts_at_least=before + 1)


def _second_server(directory, engine_options=None, **app_options):
    llm = LLM(directory, num_blocks=64, block_size=4, **(engine_options or {}))
    app = build_app(llm.engine, MODEL, **app_options)
    return LiveServer(app), app, llm.engine


def test_ngram_drafts_stream_the_same_text_and_show_in_metrics(served):
    """Several tokens per step (kept drafts) stream as the same text, logprobs included."""
    params = dict(model=MODEL, max_tokens=24, temperature=0, extra_body={"ignore_eos": True},
                  logprobs=1)
    expected = openai.OpenAI(base_url=served[0].url + "/v1", api_key=KEY, max_retries=0,
                             timeout=30).completions.create(prompt=REPEATS, **params)
    server, _, _ = _second_server(served[2], engine_options=dict(speculative_config={
        "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
        "prompt_lookup_max": 3}))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                               timeout=30)
        chunks = list(client.completions.create(prompt=REPEATS, stream=True, **params))
        assert "".join(c.choices[0].text for c in chunks) == expected.choices[0].text
        streamed = [t for c in chunks for t in c.choices[0].logprobs.token_logprobs]
        assert streamed == pytest.approx(expected.choices[0].logprobs.token_logprobs, abs=1e-5)
        m = _metrics((server,))
        assert 0 < m["mlx_serve_spec_decode_num_accepted_tokens_total"] \
            <= m["mlx_serve_spec_decode_num_draft_tokens_total"]
        assert m["mlx_serve_kv_blocks_used"] == 0
    finally:
        server.stop()


def test_overload_is_503_with_retry_after_and_internal_errors_do_not_leak(served, monkeypatch):
    server, app, engine = _second_server(served[2], max_waiting_seqs=0)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=MODEL, prompt=PROMPT)
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
        assert e.value.response.json()["error"]["code"] == "overloaded"

        def broken(*args, **kwargs):
            raise RuntimeError("secret internals")

        monkeypatch.setattr(engine.tokenizer, "encode", broken)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=MODEL, prompt=PROMPT)
        body = e.value.response.text
        assert e.value.status_code == 500 and "secret" not in body and "Traceback" not in body
        assert json.loads(body)["error"]["type"] == "server_error"
    finally:
        server.stop()


def test_shutdown_aborts_streams_and_a_failing_engine_answers_503(served, monkeypatch):
    server, app, engine = _second_server(served[2])
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(model=MODEL, prompt=PROMPT, stream=True,
                                           max_tokens=200, temperature=0,
                                           extra_body={"ignore_eos": True})
        chunks = iter(stream)
        next(chunks)  # running, holding blocks, when the server is told to stop
    finally:
        server.stop()
    assert [c.choices[0].finish_reason for c in chunks][-1] == "abort"
    assert not server.thread.is_alive() and not app.state.engine.healthy
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks and not engine.requests

    server, app, engine = _second_server(served[2])
    try:
        def broken():
            raise RuntimeError("kernel exploded")

        monkeypatch.setattr(engine, "step", broken)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=MODEL, prompt=PROMPT)
        assert e.value.status_code == 503 and "exploded" not in e.value.response.text
        status, _ = _get((server,), "/health")
        assert status == 503
    finally:
        server.stop()


def _post(url, path, body, key=KEY):
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def served_with_lora(served, tmp_path_factory):
    """The same tiny model with a random PEFT LoRA adapter "sql", runtime loading allowed; and
    the offline engine's greedy text for the base model and for the adapter."""
    import peft
    import transformers

    _, _, directory = served
    torch.manual_seed(1)
    adapter = tmp_path_factory.mktemp("lora") / "sql"
    peft_model = peft.get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(directory),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1.0)
    peft_model.save_pretrained(adapter)
    llm = LLM(directory, num_blocks=64, block_size=4, loras={"sql": adapter})
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = {name: llm.generate(PROMPT, params, lora=name)[0].outputs[0].text
                for name in (None, "sql")}
    assert expected[None] != expected["sql"], "the adapter must change the text"
    server = LiveServer(build_app(llm.engine, MODEL, api_key=KEY, allow_runtime_lora=True))
    yield server, adapter, expected
    server.stop()


def test_lora_adapters_are_models_and_load_and_unload_at_run_time(served_with_lora, served):
    server, adapter, expected = served_with_lora
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    models = {m.id: m for m in client.models.list().data}
    assert list(models) == [MODEL, "sql"] and models["sql"].parent == MODEL
    args = dict(prompt=PROMPT, temperature=0, max_tokens=12, extra_body={"ignore_eos": True})
    base = client.completions.create(model=MODEL, **args)
    sql = client.completions.create(model="sql", **args)
    assert (base.choices[0].text, sql.choices[0].text) == (expected[None], expected["sql"])
    assert sql.model == "sql"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="sql", stream=True, **args) if c.choices)
    assert streamed == expected["sql"]

    assert _post(server.url, "/v1/load_lora_adapter",
                 {"lora_name": "sql2", "lora_path": str(adapter)})[0] == 200
    assert client.completions.create(model="sql2", **args).choices[0].text == expected["sql"]
    status, body = _post(server.url, "/v1/load_lora_adapter",
                         {"lora_name": "bad", "lora_path": str(adapter) + "-missing"})
    assert status == 400 and "does not exist" in json.loads(body)["error"]["message"]
    assert _post(server.url, "/v1/unload_lora_adapter", {"lora_name": "sql2"})[0] == 200
    with pytest.raises(openai.NotFoundError, match="'sql2' does not exist"):
        client.completions.create(model="sql2", **args)
    status, body = _post(server.url, "/v1/unload_lora_adapter", {"lora_name": "sql2"})
    assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found"
    _wait_all_blocks_free((server,))
    # the server without --allow-runtime-lora has no such routes
    assert _post(served[0].url, "/v1/load_lora_adapter",
                 {"lora_name": "x", "lora_path": str(adapter)})[0] == 404


def test_serve_command_rejects_a_malformed_lora_option():
    from typer.testing import CliRunner

    from mlx_core.cli.app import build_app as build_cli

    result = CliRunner().invoke(build_cli(), ["serve", "--lora", "no-directory-given"])
    text = re.sub(r"[\s│╭╮╰╯─]+", " ", result.output)  # rich wraps the message in a box
    assert result.exit_code != 0 and "--lora takes NAME=DIR" in text, text


def test_priority_needs_the_priority_policy_and_reaches_the_scheduler(served, client, monkeypatch):
    with pytest.raises(openai.BadRequestError, match="--scheduling-policy priority") as e:
        client.completions.create(prompt=PROMPT, **_greedy(priority=1))
    assert e.value.body["param"] == "priority"
    expected = client.completions.create(prompt=PROMPT, **_greedy()).choices[0].text

    _, _, directory = served
    engine = LLM(directory, num_blocks=64, block_size=4, scheduling_policy="priority").engine
    admitted = []
    real = engine.scheduler.add
    monkeypatch.setattr(engine.scheduler, "add", lambda seq: admitted.append(seq.priority) or real(seq))
    server = LiveServer(build_app(engine, MODEL, api_key=KEY))
    try:
        ranked = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
        done = ranked.completions.create(prompt=PROMPT, **_greedy(priority=-3))
        assert done.choices[0].text == expected and admitted == [-3]
    finally:
        server.stop()


def test_serve_command_passes_the_engine_options(tiny_model_dir, monkeypatch):
    from typer.testing import CliRunner

    from mlx_core.cli.app import build_app as build_cli
    from mlx_serve import server

    started = []
    monkeypatch.setattr(server, "run_server", lambda app, *args: started.append(app))
    result = CliRunner().invoke(build_cli(), [
        "serve", "--model", str(tiny_model_dir), "--kv-cache-memory", "1MiB",
        "--no-enable-prefix-caching", "--no-enable-chunked-prefill",
        "--max-num-batched-tokens", "64", "--scheduling-policy", "priority",
        "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}',
        "--no-prepack-weights"])
    assert result.exit_code == 0, result.output
    engine = started[0].state.engine.engine
    config = engine.scheduler.config
    assert not engine.blocks.enable_prefix_caching and not config.enable_chunked_prefill
    assert config.max_num_batched_tokens == 64 and config.policy == "priority"
    assert engine.scheduler.proposer.config.num_speculative_tokens == 2
    assert not engine.config.prepack_weights and engine.runner.packed_bytes == 0
    for option, value, message in [
            ("--scheduling-policy", "lifo", "scheduling policy must be 'fcfs' or 'priority'"),
            ("--speculative-config", "{ngram}", "--speculative-config takes a JSON object"),
            ("--speculative-config", '{"method": "eagle"}',
             "speculative method 'eagle' is not supported"),
            ("--speculative-config", '{"method": "ngram", "lookahead": 3}',
             "unknown speculative_config fields ['lookahead']")]:
        bad = CliRunner().invoke(build_cli(), ["serve", "--model", str(tiny_model_dir), option,
                                               value])
        text = re.sub(r"[\s│╭╮╰╯─]+", " ", bad.output)
        assert bad.exit_code != 0 and message in text, text
