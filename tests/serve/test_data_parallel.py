"""Data-parallel replicas (``mlx serve --data-parallel-size N``, mlx_serve.data_parallel).

The router's choice on its own; then two replicas (each a whole engine in a process of its own,
on int8 weights with n-gram drafts and chunked prompts) behind one server, driven with the
official ``openai`` client: greedy outputs equal one engine's (completions and chat, streamed
and not, a LoRA adapter, a JSON schema, embeddings), adapters loaded at run time on every
replica, a prompt sent where its prefix is cached, an abort storm, then a load larger than both
caches (preemption, the same greedy text), each leaving every block of every replica free;
``mlx bench serve --data-parallel-size 2``. Last, ``mlx serve`` as a user starts it: a replica
killed makes it answer 503 and exit 1, SIGTERM stops it, and neither leaves a process behind.
"""

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import psutil
import pytest
import torch
from typer.testing import CliRunner

from mlx_core.cli.app import build_app as build_cli
from mlx_serve import LLM, SamplingParams
from mlx_serve.data_parallel import DataParallelEngine, PrefixAwareRouter
from mlx_serve.engine import EngineStats
from mlx_serve.server import build_app
from tests.serve.helpers import (
    LiveServer,
    assert_a_killed_child_stops_the_server,
    assert_sigterm_stops_everything,
    byte_level_model_dir,
    spawned_children,
    start_mlx_serve,
)

MODEL = "tiny-dp"
# engine features pass through to every replica: int8 weights, n-gram drafts, prompts chunked
OPTIONS = dict(num_blocks=256, block_size=4, prepack_weights=False, max_loras=2, max_lora_rank=8,
               quantization="int8", max_num_batched_tokens=32,
               speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                   "prompt_lookup_min": 1})
PROMPTS = ["The quick brown", '{"color": "red", "count"', "yes no maybe (555)", "[1, 2, 3]"]


def _stats(free: int, running: int = 0, total: int = 64) -> EngineStats:
    return EngineStats(num_running=running, num_waiting=0, num_blocks=total,
                       num_free_blocks=free, prefix_cache_hit_rate=0.0, num_preemptions=0,
                       prompt_tokens=0, generation_tokens=0)


def test_router_prefers_the_replica_caching_the_prefix_else_the_most_free_blocks():
    prefix = list(range(10, 26))  # 4 full blocks of 4 tokens
    router = PrefixAwareRouter([64, 64], block_size=4)
    router.report(0, _stats(40))
    router.report(1, _stats(60))
    assert router.route("a", prefix + [1, 2]) == 1  # nothing cached anywhere: most free blocks
    router.admitted(1, "a")
    router.report(1, _stats(30, running=1))  # now the busier one, but it caches the prefix
    assert router.route("b", prefix + [3, 4, 5]) == 1
    assert router.route("c", [7] * 18) == 0  # no cached prefix: most free blocks
    assert router.route("d", prefix + [3], lora_name="sql") == 0  # another adapter's prefix

    # a burst spreads out before any replica reports: blocks sent count against free ones
    router = PrefixAwareRouter([64, 64], block_size=4)
    assert [router.route(f"x{i}", [i] * 8) for i in range(4)] == [0, 1, 0, 1]

    # the preference gives way to balance and to room
    router = PrefixAwareRouter([64, 64], block_size=4, balance_threshold=2)
    assert router.route("p", prefix) == 0
    router.admitted(0, "p")
    router.report(0, _stats(60, running=3))
    router.report(1, _stats(60))
    assert router.route("q", prefix) == 1  # 3 sequences more than replica 1 > 2
    router.report(0, _stats(1, running=1))
    router.report(1, _stats(64))
    assert router.route("r", prefix + [9] * 8) == 1  # no room there for its uncached blocks


def test_what_crosses_the_pipe_pickles():
    import pickle

    from mlx_serve.async_engine import EngineOverloaded
    from mlx_serve.outputs import CompletionOutput, RequestMetrics, RequestOutput

    params = SamplingParams(n=2, temperature=0.7, seed=3, stop=["\n"], logprobs=2,
                            guided_decoding={"json": {"type": "object"}})
    out = RequestOutput("r-0", "hi", [1, 2], [CompletionOutput(0, "a", [5], -0.5, [{5: -0.5}],
                                                               "stop", "\n")],
                        True, RequestMetrics(1.0, 2.0, 3.0, 16), [None, {2: -1.0}])
    for value in (params, out, _stats(3), EngineOverloaded("9 sequences are already waiting")):
        again = pickle.loads(pickle.dumps(value))
        assert repr(again) == repr(value)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """The byte-level tiny model and a random LoRA adapter for it."""
    from mlx_adapters import LoraConfig, get_peft_model
    from mlx_core import load_model

    root = tmp_path_factory.mktemp("dp")
    directory = byte_level_model_dir(root)
    torch.manual_seed(1)
    peft_model = get_peft_model(load_model(directory), LoraConfig(
        r=8, lora_alpha=32, init_lora_weights=False, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(root / "adapter")
    return directory, root / "adapter"


@pytest.fixture(scope="module")
def served(model_dirs):
    directory, adapter = model_dirs
    engine = DataParallelEngine(str(directory), 2, loras={"ad": str(adapter)}, **OPTIONS)
    server = LiveServer(build_app(engine, MODEL, allow_runtime_lora=True))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    yield server, client, engine
    server.stop()
    assert all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
               for pid in engine.pids)


def _metrics(server) -> dict[str, float]:
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def _replica(m: dict, name: str, replica: int) -> float:
    return m[f'mlx_serve_{name}{{replica="{replica}"}}']


def _wait_idle_and_free(server, timeout: float = 20.0) -> dict:
    """Every replica's blocks free and nothing running or waiting (the storm's check)."""
    deadline = time.monotonic() + timeout
    while True:
        m = _metrics(server)
        if all(_replica(m, "kv_blocks_free", r) == _replica(m, "kv_blocks_total", r)
               and _replica(m, "num_seqs_running", r) == _replica(m, "num_seqs_waiting", r) == 0
               for r in (0, 1)):
            return m
        assert time.monotonic() < deadline, f"blocks still held: {m}"
        time.sleep(0.05)


def _greedy(model=MODEL, max_tokens=10):
    return dict(model=model, temperature=0, max_tokens=max_tokens,
                extra_body={"ignore_eos": True})


def test_two_replicas_serve_the_openai_client_with_one_engines_greedy_outputs(served,
                                                                             model_dirs):
    server, client, engine = served
    directory, adapter = model_dirs
    one = LLM(directory, loras={"ad": str(adapter)}, **OPTIONS)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = {(p, lora): one.generate(p, params, lora=lora)[0].outputs[0].text
                for p in PROMPTS for lora in (None, "ad")}
    assert expected[PROMPTS[0], None] != expected[PROMPTS[0], "ad"]  # the adapter matters
    before = _metrics(server)
    with ThreadPoolExecutor(8) as pool:  # at once: both replicas serve
        done = {(p, lora): pool.submit(client.completions.create, prompt=p,
                                       **_greedy(lora or MODEL))
                for p in PROMPTS for lora in (None, "ad")}
        assert {key: f.result().choices[0].text for key, f in done.items()} == expected
    after = _metrics(server)
    assert all(_replica(after, "prompt_tokens_total", r) > _replica(before, "prompt_tokens_total", r)
               for r in (0, 1))
    assert sum(_replica(after, "spec_decode_num_draft_tokens_total", r) for r in (0, 1)) > 0

    streamed = "".join(c.choices[0].text for c in client.completions.create(
        prompt=PROMPTS[1], stream=True, **_greedy()) if c.choices)
    assert streamed == expected[PROMPTS[1], None]
    messages = [{"role": "user", "content": "The quick brown fox"}]
    chat = one.chat(messages, params)[0].outputs[0].text
    assert client.chat.completions.create(messages=messages, **_greedy()).choices[0] \
        .message.content == chat
    assert "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        messages=messages, stream=True, **_greedy()) if c.choices) == chat

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    constrained = client.chat.completions.create(
        messages=messages, model=MODEL, temperature=0, max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    assert set(json.loads(constrained.choices[0].message.content)) == {"ok"}
    embedded = client.embeddings.create(model=MODEL, input=["red", "blue"])
    expected_vectors = one.embed(["red", "blue"])
    for got, want in zip(embedded.data, expected_vectors, strict=True):
        assert got.embedding == pytest.approx(want.outputs.embedding, abs=1e-5)


def _post(server, path: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_adapters_loaded_at_run_time_reach_every_replica(served, model_dirs):
    server, client, engine = served
    _, adapter = model_dirs
    assert _post(server, "/v1/load_lora_adapter",
                 {"lora_name": "again", "lora_path": str(adapter)})[0] == 200
    assert {m.id for m in client.models.list().data} == {MODEL, "ad", "again"}
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda p: client.completions.create(
            prompt=p, **_greedy("again")).choices[0].text, PROMPTS))
    assert texts == [client.completions.create(prompt=p, **_greedy("ad")).choices[0].text
                     for p in PROMPTS]
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "again"})[0] == 200
    assert engine.engine.list_loras() == ["ad"]
    status, body = _post(server, "/v1/load_lora_adapter",
                         {"lora_name": "bad", "lora_path": "/nonexistent"})
    assert status == 400 and engine.engine.list_loras() == ["ad"]


def test_a_prompt_goes_to_the_replica_that_caches_its_prefix(served):
    """Replica 1 caches a prefix and holds a long stream; replica 0 is idle, so it has more
    free blocks: the prompt that shares the prefix still goes to replica 1 (its cached tokens
    say so), an unrelated one to replica 0."""
    server, client, engine = served
    _wait_idle_and_free(server)
    g = torch.Generator().manual_seed(7)
    prefix, other, long_a, long_b = (torch.randint(3, 300, (n,), generator=g).tolist()
                                     for n in (40, 21, 6, 30))
    hold = dict(model=MODEL, temperature=0, max_tokens=800, stream=True,
                extra_body={"ignore_eos": True})
    first = client.completions.create(prompt=long_a, **hold)  # to replica 0 (all idle)
    next(iter(first))
    seeded = client.completions.create(prompt=prefix, **_greedy())  # to replica 1: more free
    assert seeded.usage.prompt_tokens_details.cached_tokens == 0
    second = client.completions.create(prompt=long_b, **hold)  # to replica 1: more free
    next(iter(second))
    first.close()  # replica 0: every block free again, more than replica 1
    deadline = time.monotonic() + 20
    while engine.replica_stats[0].num_free_blocks < engine.replica_stats[0].num_blocks:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    before = _metrics(server)
    shared = client.completions.create(prompt=prefix + [5, 6, 7], **_greedy())
    assert shared.usage.prompt_tokens_details.cached_tokens >= len(prefix)
    client.completions.create(prompt=other, **_greedy())
    after = _metrics(server)
    second.close()
    grown = [_replica(after, "prompt_tokens_total", r) - _replica(before, "prompt_tokens_total", r)
             for r in (0, 1)]
    assert grown == [len(other), len(prefix) + 3]


def test_an_abort_storm_leaves_every_block_of_every_replica_free(served):
    server, client, engine = served
    quick = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                          timeout=0.3)

    def stream_then_leave(i):
        stream = client.completions.create(prompt=PROMPTS[i % 4] + f" {i}", model=MODEL,
                                           max_tokens=300, stream=True, temperature=0.8,
                                           extra_body={"ignore_eos": True})
        for _ in zip(range(1 + i % 3), stream, strict=False):
            pass
        stream.close()

    def wait_then_leave(i):
        with pytest.raises(openai.APITimeoutError):
            quick.completions.create(prompt=PROMPTS[i % 4], model=MODEL, max_tokens=800,
                                     extra_body={"ignore_eos": True})

    before = _metrics(server)
    with ThreadPoolExecutor(12) as pool:
        list(pool.map(lambda i: (stream_then_leave if i % 3 else wait_then_leave)(i), range(36)))
    after = _wait_idle_and_free(server)
    assert all(_replica(after, "prompt_tokens_total", r) > _replica(before, "prompt_tokens_total", r)
               for r in (0, 1))
    assert after['mlx_serve_requests_finished_total{finish_reason="abort"}'] >= 36 + before.get(
        'mlx_serve_requests_finished_total{finish_reason="abort"}', 0)
    assert all(s.num_free_blocks == s.num_blocks for s in engine.replica_stats)

    # then more than both caches hold: sequences are preempted (recomputed later), give the
    # greedy text they give alone, and leave every block free again
    alone = [client.completions.create(prompt=f"{p} {i}", **_greedy(max_tokens=200))
             .choices[0].text for i, p in enumerate(PROMPTS)]
    with ThreadPoolExecutor(16) as pool:
        crowded = list(pool.map(lambda i: client.completions.create(
            prompt=f"{PROMPTS[i % 4]} {i % 4 if i < 4 else i}", **_greedy(max_tokens=200))
            .choices[0].text, range(16)))
    assert crowded[:4] == alone
    after = _wait_idle_and_free(server)
    assert sum(_replica(after, "preemptions_total", r) for r in (0, 1)) > 0


def test_bench_serve_reports_two_replicas_against_one_engine(model_dirs, tmp_path):
    directory, _ = model_dirs
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(build_cli(), [
        "bench", "serve", "--model", str(directory), "--num-requests", "6", "--prompt-len",
        "4:12", "--output-len", "2:6", "--request-rate", "0", "--hf-batch-sizes", "4",
        "--kv-cache-memory", "4MiB", "--no-prepack-weights", "--data-parallel-size", "2",
        "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    dp = report["data_parallel"]
    assert dp["size"] == 2 and dp["leaked_blocks_per_replica"] == [0, 0]
    assert dp["replicas"]["output_tokens"] == dp["one_engine"]["output_tokens"] == report[
        "mlx_all_at_once"]["output_tokens"]
    measured = dp["replicas"]["output_tokens_per_s"] / dp["one_engine"]["output_tokens_per_s"]
    assert abs(dp["ratio"] - measured) < 0.02 * measured + 0.01
    assert "data-parallel (2 replicas" in result.output


# -- `mlx serve --data-parallel-size 2` as a user starts it ----------------------------------------
def _start_mlx_serve(directory: Path, log: Path):
    return start_mlx_serve(["--model", str(directory), "--data-parallel-size", "2",
                            "--kv-cache-memory", "1MiB", "--block-size", "4",
                            "--no-prepack-weights", "--no-ui", "--log-level", "warning"], log)


def test_a_killed_replica_makes_mlx_serve_answer_503_and_exit_non_zero(model_dirs, tmp_path):
    directory, _ = model_dirs
    log = tmp_path / "serve.log"
    proc, url = _start_mlx_serve(directory, log)
    try:
        replicas, started = spawned_children(proc.pid)
        assert len(replicas) == 2, started
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=10)
        error = assert_a_killed_child_stops_the_server(proc, replicas[0], started, client,
                                                       str(directory), log, "replica 0")
        assert error is not None and "replica" in error.message  # at once: its pipe closes
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_stops_mlx_serve_and_every_replica(model_dirs, tmp_path):
    directory, _ = model_dirs
    proc, url = _start_mlx_serve(directory, tmp_path / "serve.log")
    try:
        replicas, started = spawned_children(proc.pid)
        assert len(replicas) == 2, started
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
        assert client.completions.create(model=str(directory), prompt="hi",
                                         max_tokens=3).usage.completion_tokens > 0
        assert_sigterm_stops_everything(proc, started, tmp_path / "serve.log")
    finally:
        if proc.poll() is None:
            proc.kill()
