"""Tensor-parallel serving (mlx_serve.tensor_parallel): two processes on this CPU, joined over
gloo, give one rank's tokens and log-probabilities, with every engine feature on; nothing
leaks after aborts; a dead worker stops the engine with a clear error; no process outlives it."""

from __future__ import annotations

import os
import signal
import time

import pytest

from mlx_serve import LLM, SamplingParams
from mlx_serve.tensor_parallel import WorkerDied
from tests.serve.helpers import byte_level_model_dir

SPECULATIVE = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}
SCHEMA = {"type": "object", "properties": {"color": {"type": "string"}}, "required": ["color"]}
# a cache of 14 blocks of 4 tokens for prompts of ~20 tokens and 16 new ones: sequences wait,
# get preempted and computed again; 12 tokens a step: prompts run in chunks
ENGINE = dict(num_blocks=14, block_size=4, max_num_batched_tokens=12, max_num_seqs=4)


def _requests():
    shared = '{"color": "red", "count": 3, "ok": true} The quick brown'
    prompts = [shared, shared + " fox jumps", "yes no maybe (555) 123-4567", "[1, 2, 3]",
               '{"a": null}']
    greedy = SamplingParams(max_tokens=16, temperature=0, logprobs=2, ignore_eos=True)
    params = [greedy, greedy, SamplingParams(max_tokens=12, temperature=0.8, seed=7, n=2),
              greedy, SamplingParams(max_tokens=24, temperature=0,
                                     guided_decoding={"json": SCHEMA})]
    return prompts, params


def _tokens(outputs):
    return [[c.token_ids for c in o.outputs] for o in outputs]


def _logprobs(outputs):
    return [c.logprobs for o in outputs for c in o.outputs if c.logprobs is not None]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return byte_level_model_dir(tmp_path_factory.mktemp("tp-model"))


def test_two_ranks_give_one_rank_tokens_with_every_feature(model_dir):
    prompts, params = _requests()
    one = LLM(str(model_dir), **ENGINE)
    want = one.generate(prompts, params)
    want_spec = one.generate(prompts[:2], params[0])
    with LLM(str(model_dir), tensor_parallel_size=2, **ENGINE) as llm:
        assert llm.engine.parallel is not None and len(llm.engine.parallel.processes) == 1
        got = llm.generate(prompts, params)
        assert _tokens(got) == _tokens(want)
        for a, b in zip(_logprobs(got), _logprobs(want), strict=True):
            for step_a, step_b in zip(a, b, strict=True):
                assert step_a.keys() == step_b.keys()
                assert all(abs(step_a[t] - step_b[t]) < 1e-4 for t in step_a)
        stats = llm.engine.stats()
        assert stats.num_preemptions > 0 and stats.prefix_cache_hit_rate > 0
        assert stats.num_free_blocks == stats.num_blocks
        # embeddings run on every rank too
        (a, b) = llm.embed(prompts[:2]), one.embed(prompts[:2])
        for x, y in zip(a, b, strict=True):
            assert max(abs(p - q) for p, q in zip(x.outputs.embedding, y.outputs.embedding,
                                                  strict=True)) < 1e-5
    with LLM(str(model_dir), tensor_parallel_size=2, speculative_config=SPECULATIVE,
             **ENGINE) as llm:
        got = llm.generate(prompts[:2], params[0])
        assert _tokens(got) == _tokens(want_spec)
        assert llm.engine.num_draft_tokens > 0


def test_lora_adapters_split_with_the_layers_they_adapt(model_dir, tmp_path):
    import torch

    from mlx_adapters import LoraConfig, get_peft_model
    from mlx_core import load_model

    torch.manual_seed(1)  # column-parallel (q, v, gate) and row-parallel (o, down) layers
    peft_model = get_peft_model(load_model(model_dir), LoraConfig(
        r=8, lora_alpha=32, init_lora_weights=False,
        target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]))
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.3)  # an adapter that changes the tokens
    peft_model.save_pretrained(tmp_path / "adapter")
    prompts = ['{"color": "red"', "[1, 2, 3]", "yes no maybe"]
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=1)
    lora = ["a", None, "a"]  # adapted and base rows in one batch
    one = LLM(str(model_dir), loras={"a": str(tmp_path / "adapter")}, **ENGINE)
    want = one.generate(prompts, params, lora=lora)
    assert _tokens(want) != _tokens(one.generate(prompts, params))  # the adapter matters
    with LLM(str(model_dir), tensor_parallel_size=2, loras={"a": str(tmp_path / "adapter")},
             **ENGINE) as llm:
        assert _tokens(llm.generate(prompts, params, lora=lora)) == _tokens(want)
        llm.remove_lora("a")  # on every rank; loaded again into the same slot
        llm.add_lora("b", tmp_path / "adapter")
        got = llm.generate(prompts, params, lora=["b", None, "b"])
        assert _tokens(got) == _tokens(want)
        for a, b in zip(_logprobs(got), _logprobs(want), strict=True):
            for step_a, step_b in zip(a, b, strict=True):
                assert all(abs(step_a[t] - step_b[t]) < 1e-4 for t in step_a)


def test_aborts_free_every_block_and_a_dead_worker_stops_the_engine(model_dir):
    llm = LLM(str(model_dir), tensor_parallel_size=2, **ENGINE)
    engine = llm.engine
    ids = [engine.add_request(f"[{i}, 2, 3] yes no", SamplingParams(max_tokens=30))
           for i in range(8)]
    for _ in range(3):
        engine.step()
    for request_id in ids:  # an abort storm mid-run
        engine.abort_request(request_id)
    engine.step()
    assert not engine.has_unfinished_requests()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    worker = engine.parallel.processes[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(10)
    started = time.monotonic()
    with pytest.raises(WorkerDied, match="rank 1 .* exited"):
        llm.generate("[1, 2, 3]", SamplingParams(max_tokens=4))
    assert time.monotonic() - started < 5
    llm.close()
    assert not worker.is_alive()


def test_close_leaves_no_process_behind(model_dir):
    llm = LLM(str(model_dir), tensor_parallel_size=2, **ENGINE)
    pids = [p.pid for p in llm.engine.parallel.processes]
    llm.generate("[1, 2, 3]", SamplingParams(max_tokens=4))
    llm.close()
    assert all(not os.path.exists(f"/proc/{pid}") for pid in pids)
    llm.close()  # twice is harmless


def test_unsupported_combinations_fail_naming_the_fix(model_dir, tmp_path):
    with pytest.raises(ValueError, match="multiple of nnodes"):
        LLM(str(model_dir), tensor_parallel_size=3, nnodes=2)
    with LLM(str(model_dir), tensor_parallel_size=2, **ENGINE) as llm:
        # a bad adapter fails on rank 0, before any worker reads it: the engine goes on
        with pytest.raises(FileNotFoundError, match="does not exist"):
            llm.add_lora("a", tmp_path / "missing")
        assert llm.generate("[1, 2, 3]", SamplingParams(max_tokens=2))[0].outputs[0].token_ids


@pytest.mark.builtin_model
@pytest.mark.slow
def test_builtin_model_two_ranks_same_greedy_tokens():
    # SmolLM2: 9 query heads over 3 KV heads, split 6 + 3 (2 + 1 KV heads) on 2 ranks
    prompts = ["The capital of France is", "Write a haiku about the sea.", "1, 2, 3, 4,",
               "The capital of France is a city that", "def fibonacci(n):"]
    params = SamplingParams(max_tokens=24, temperature=0)
    options = dict(max_num_batched_tokens=24, num_blocks=24, block_size=8)
    want = LLM(**options).generate(prompts, params)
    with LLM(tensor_parallel_size=2, **options) as llm:
        got = llm.generate(prompts, params)
        assert llm.engine.model.config.kv_heads == 2  # rank 0's share of the cache
    assert _tokens(got) == _tokens(want)
    # int8: quantized whole, then split (every rank the whole model's codes and scales). Its
    # CPU kernel rounds each output to bf16, each rank's partial sum included, so near-ties may
    # flip: the prompts' log-probabilities are compared, teacher-forced, and the split may move
    # them no more than int8 itself moves them from fp32
    scored = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    fp32 = LLM(**options).generate(prompts, scored)
    want = LLM(quantization="int8", **options).generate(prompts, scored)
    with LLM(quantization="int8", tensor_parallel_size=2, **options) as llm:
        got = llm.generate(prompts, scored)

    def gaps(these, those):
        return [abs(a[t] - b[t]) for x, y in zip(these, those, strict=True)
                for a, b in zip(x.prompt_logprobs[1:], y.prompt_logprobs[1:], strict=True)
                for t in a]

    split, quantized = gaps(got, want), gaps(want, fp32)
    assert len(split) > 20 and max(split) <= max(quantized), (max(split), max(quantized))


def test_bench_serve_reports_two_ranks_against_one_process(tiny_model_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from mlx_core.cli.app import build_app

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(build_app(), [
        "bench", "serve", "--model", str(tiny_model_dir), "--num-requests", "6",
        "--prompt-len", "4:12", "--output-len", "4:8", "--request-rate", "0",
        "--hf-batch-sizes", "4", "--kv-cache-memory", "4MiB", "--tensor-parallel-size", "2",
        "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    tp = report["tensor_parallel"]
    assert tp["size"] == 2 and tp["leaked_blocks"] == 0
    assert tp["tensor_parallel"]["output_tokens"] == report["mlx_all_at_once"]["output_tokens"]
    assert abs(tp["ratio"] - tp["tensor_parallel"]["output_tokens_per_s"]
               / tp["one_process"]["output_tokens_per_s"]) < 0.01 * tp["ratio"] + 0.002
    # per layer two all-reduces, plus the embedding's and the logits' gather
    assert tp["collectives_per_step"] >= 2 * 2 + 2 and tp["collective_ms_per_step"] > 0
    assert "tensor-parallel (2 ranks" in result.output
    import torch

    assert report["threads"] == torch.get_num_threads()  # given back when the engine closed


# -- `mlx serve --tensor-parallel-size 2` as a user starts it --------------------------------------
SERVE = ["--kv-cache-memory", "1MiB", "--block-size", "4", "--no-ui", "--log-level", "warning"]


def _answers_as_one_process(url: str, model_dir):
    """The official client's greedy completion equals one process's; the client."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
    got = client.completions.create(model=str(model_dir), prompt="[1, 2, 3]", max_tokens=8,
                                    temperature=0)
    want = LLM(str(model_dir)).generate("[1, 2, 3]", SamplingParams(max_tokens=8, temperature=0))
    assert got.choices[0].text == want[0].outputs[0].text
    return client


def test_mlx_serve_two_ranks_then_a_killed_worker_gives_503_and_exit_1(model_dir, tmp_path):
    from tests.serve.helpers import (
        assert_a_killed_child_stops_the_server,
        spawned_children,
        start_mlx_serve,
    )

    log = tmp_path / "serve.log"
    proc, url = start_mlx_serve(["--model", str(model_dir), "--tensor-parallel-size", "2", *SERVE],
                                log)
    try:
        workers, started = spawned_children(proc.pid)
        assert len(workers) == 1, started
        client = _answers_as_one_process(url, model_dir)
        # 503 as soon as the engine notices, idle or not; exit 1; no process left
        assert_a_killed_child_stops_the_server(proc, workers[0], started, client,
                                               str(model_dir), log, "rank 1")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_two_nodes_join_over_master_addr_and_port(model_dir, tmp_path):
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from tests.serve.helpers import assert_gone, spawned_children, start_mlx_serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    joint = ["--model", str(model_dir), "--tensor-parallel-size", "2", "--nnodes", "2",
             "--master-addr", "127.0.0.1", "--master-port", port]
    with open(tmp_path / "node1.log", "w") as out:  # the other machine: its rank, no server
        node1 = subprocess.Popen([str(Path(sys.executable).parent / "mlx"), "serve", *joint,
                                  "--node-rank", "1", "--no-prepack-weights"],
                                 stdout=out, stderr=subprocess.STDOUT)
    node0 = None
    try:
        node0, url = start_mlx_serve([*joint, *SERVE], tmp_path / "node0.log")
        assert spawned_children(node0.pid)[0] == []  # node 0 runs rank 0 alone, in itself
        _answers_as_one_process(url, model_dir)
        node1_ranks = spawned_children(node1.pid)[1]
        node0.send_signal(signal.SIGTERM)
        assert node0.wait(30) in (0, -signal.SIGTERM), (tmp_path / "node0.log").read_text()
        assert node1.wait(30) == 0, (tmp_path / "node1.log").read_text()  # stopped by rank 0
        assert_gone(node1_ranks)
    finally:
        for proc in (node0, node1):
            if proc is not None and proc.poll() is None:
                proc.kill()


def test_mlx_generate_two_ranks_prints_what_one_process_does(tiny_model_dir):
    from typer.testing import CliRunner

    from mlx_core.cli.app import build_app

    def generate(*extra):
        done = CliRunner().invoke(build_app(), ["generate", "-m", str(tiny_model_dir), "-p",
                                                "hello there", "-n", "6", "--no-chat", *extra])
        assert done.exit_code == 0, done.output
        return done.output

    one = generate()
    assert generate("--tensor-parallel-size", "2") == one and one.strip()
    refused = CliRunner().invoke(build_app(), ["generate", "-m", str(tiny_model_dir), "-p", "hi",
                                               "--tp", "2", "--compile"])
    assert refused.exit_code != 0 and "drop --backend/--compile" in refused.output


def test_replicas_of_tensor_parallel_engines(model_dir, tmp_path):
    """mlx serve -dp 2 -tp 2: two replicas, each an engine split over two processes (the
    replica's threads shared by its ranks); one process's answers; SIGTERM leaves none."""
    from tests.serve.helpers import (
        assert_sigterm_stops_everything,
        spawned_children,
        start_mlx_serve,
    )

    proc, url = start_mlx_serve(["--model", str(model_dir), "-dp", "2", "-tp", "2", *SERVE],
                                tmp_path / "serve.log")
    try:
        _answers_as_one_process(url, model_dir)
        ranks, started = spawned_children(proc.pid)
        assert len(ranks) == 4, started  # 2 replicas (rank 0 of each) + their workers
        assert_sigterm_stops_everything(proc, started, tmp_path / "serve.log")
    finally:
        if proc.poll() is None:
            proc.kill()
