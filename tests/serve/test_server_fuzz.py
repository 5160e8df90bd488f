"""The server fuzzed with schemathesis from its own OpenAPI schema: whatever the generated
requests (valid ones, and bodies that break the schema), no 5xx and no hang; afterwards the
engine still serves and every KV block is free again."""

import json
import time
import urllib.request

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from mlx_serve import LLM
from mlx_serve.server import build_app
from tests.serve.helpers import LiveServer

MODEL = "tiny-fuzzed"


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, tiny_tokenizer):
    from mlx_core import build_model, get_preset, save_model

    torch.manual_seed(0)
    directory = save_model(build_model(get_preset("tiny-llama")),
                           tmp_path_factory.mktemp("fuzz") / "m", tokenizer=tiny_tokenizer)
    # a short context keeps generated max_tokens/n cheap; a small queue makes 503s reachable
    llm = LLM(directory, num_blocks=48, block_size=4, max_model_len=48, max_num_seqs=8)
    server = LiveServer(build_app(llm.engine, MODEL, max_waiting_seqs=16))
    yield server, llm.engine
    server.stop()


@pytest.fixture(scope="module")
def api_schema(fuzzed):
    return schemathesis.openapi.from_url(fuzzed[0].url + "/openapi.json")


def _operations(api_schema):
    return [result.ok() for result in api_schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                         ids=["valid-bodies", "invalid-bodies"])
def test_no_server_error_for_any_generated_request(fuzzed, api_schema, mode):
    server, _ = fuzzed
    operations = _operations(api_schema)
    assert {op.label for op in operations} >= {"POST /v1/completions", "POST /v1/chat/completions",
                                               "GET /v1/models", "GET /health"}

    for operation in operations:
        if mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET":
            continue  # no parameters or body to break

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=30, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def call(case):
            if mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
                case.body["model"] = MODEL  # else nearly every valid body is a 404
            started = time.monotonic()
            response = case.call(base_url=server.url, timeout=60)
            assert response.status_code < 500 or response.status_code == 503, (
                f"{case.method} {case.path} -> {response.status_code}: {response.text[:300]}")
            assert time.monotonic() - started < 60
            if response.status_code >= 400:  # every error is OpenAI's error object
                assert set(json.loads(response.text)["error"]) >= {"message", "type"}

        call()
    # 503 is a fair answer to one request, but not because a generated one stopped the engine
    with urllib.request.urlopen(server.url + "/health", timeout=30) as r:
        assert r.status == 200, f"the engine stopped while fuzzing {mode.name} bodies"


def test_engine_still_serves_with_every_block_free_after_fuzzing(fuzzed):
    server, engine = fuzzed
    deadline = time.monotonic() + 30
    while engine.requests or engine.blocks.num_free_blocks != engine.blocks.num_blocks:
        assert time.monotonic() < deadline, "requests or KV blocks left behind by the fuzzing"
        time.sleep(0.05)
    body = json.dumps({"model": MODEL, "prompt": "hello there", "max_tokens": 4,
                       "temperature": 0}).encode()
    request = urllib.request.Request(server.url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        reply = json.loads(r.read())
    assert reply["usage"]["completion_tokens"] >= 1
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
