"""``mlx bench serve``: the engine against HF transformers ``generate`` in static batches, on the
same seeded workload in the same process, reported as ratios.

Workload (issue 7): ``num_requests`` prompts of random token ids with lengths uniform in
``prompt_len``, each asking for a length uniform in ``output_len`` with ``ignore_eos``. Our
engine runs it twice: all requests submitted at once, and arriving as a Poisson process at
``request_rate`` requests/s. The baseline runs it through ``model.generate`` in static batches
(left padding, greedy, ``min_new_tokens`` forcing the length); only the tokens each request asked
for count as useful. A third run measures prefix caching: a shared system prompt, requests one
after another, TTFT of the later requests against the first's (in rounds, each with a new
system prompt: medians). With ``data_parallel_size`` N > 1, the all-at-once workload also goes
through the server's async front twice: to our engine alone (``AsyncEngine``, DP=1) and to N
replicas (``DataParallelEngine``), reported as the ratio of their output tokens/s. With
``tensor_parallel_size`` N > 1, it also runs through an N-way tensor-parallel engine: output
tokens/s against the one-process engine's all-at-once run, and the time in collectives per step.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from operator import methodcaller

import torch

from mlx_serve.engine import LLMEngine
from mlx_serve.sampling_params import SamplingParams


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]
    arrival_offsets: list[float]  # seconds after the start, for the request-rate run


def make_workload(num_requests: int, prompt_len: tuple[int, int], output_len: tuple[int, int],
                  vocab_size: int, request_rate: float, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    low_id = min(100, vocab_size // 2)  # skip the special tokens at the start of most vocabularies
    prompts = [[rng.randrange(low_id, vocab_size) for _ in range(rng.randint(*prompt_len))]
               for _ in range(num_requests)]
    output_lens = [rng.randint(*output_len) for _ in range(num_requests)]
    offsets, now = [], 0.0
    for _ in range(num_requests):
        offsets.append(now)
        now += rng.expovariate(request_rate) if request_rate > 0 else 0.0
    return Workload(prompts, output_lens, offsets)


@dataclass
class RunResult:
    output_tokens: int
    seconds: float
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    steps: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    def summary(self) -> dict:
        out = {"output_tokens": self.output_tokens, "seconds": round(self.seconds, 3),
               "output_tokens_per_s": round(self.tokens_per_s, 2)}
        for name, values in (("ttft", self.ttft_s), ("tpot", self.tpot_s)):
            if values:
                out[f"{name}_p50_ms"] = round(1000 * _percentile(values, 50), 1)
                out[f"{name}_p99_ms"] = round(1000 * _percentile(values, 99), 1)
        return out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# what --structured-fraction constrains its requests to: JSON that never has to end, so a
# constrained request runs as long as a free one
STRUCTURED_SCHEMA = {"type": "object", "properties": {"items": {"type": "array",
                                                                "items": {"type": "string"}}}}


def run_engine(engine: LLMEngine, workload: Workload, *, use_arrivals: bool,
               guided: dict | None = None, guided_every: int = 0) -> RunResult:
    """Drive the engine step by step; requests join when their arrival time has passed. With
    ``guided``, every ``guided_every``-th request is constrained by it (structured outputs)."""
    pending = list(range(len(workload.prompts)))
    start = time.monotonic()
    finished = []
    steps = 0
    while pending or engine.has_unfinished_requests():
        now = time.monotonic()
        while pending and (not use_arrivals or workload.arrival_offsets[pending[0]] <= now - start):
            i = pending.pop(0)
            arrival = start + workload.arrival_offsets[i] if use_arrivals else now
            constrained = guided is not None and i % guided_every == 0
            engine.add_request(workload.prompts[i], SamplingParams(
                temperature=0, max_tokens=workload.output_lens[i], ignore_eos=True,
                guided_decoding=guided if constrained else None),
                request_id=f"bench-{i}", arrival_time=arrival)
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, start + workload.arrival_offsets[pending[0]] - time.monotonic()))
            continue
        finished.extend(out for out in engine.step() if out.finished)
        steps += 1
    return _result(finished, time.monotonic() - start, steps)


def _result(finished: list, seconds: float, steps: int = 0) -> RunResult:
    """Output tokens, TTFT and TPOT of the finished requests' outputs."""
    result = RunResult(sum(len(o.outputs[0].token_ids) for o in finished), seconds, steps=steps)
    for out in finished:
        m, n = out.metrics, len(out.outputs[0].token_ids)
        result.ttft_s.append(m.first_token_time - m.arrival_time)
        if n > 1:
            result.tpot_s.append((m.finished_time - m.first_token_time) / (n - 1))
    return result


async def run_front(front, workload: Workload) -> RunResult:
    """The workload, all at once, through an async front (``AsyncEngine`` or
    ``DataParallelEngine``) as the server drives it: one ``generate`` per request."""
    async def one(i: int):
        params = SamplingParams(temperature=0, max_tokens=workload.output_lens[i],
                                ignore_eos=True)
        async for out in front.generate([(f"front-{i}", workload.prompts[i])], params):
            last = out
        return last

    start = time.monotonic()
    finished = await asyncio.gather(*(one(i) for i in range(len(workload.prompts))))
    return _result(list(finished), time.monotonic() - start)


def run_data_parallel(model: str, engine: LLMEngine, workload: Workload, size: int,
                      engine_options: dict | None = None) -> dict:
    """The all-at-once workload through the server's async front: to ``engine`` alone (DP=1,
    with every thread) and to ``size`` replicas of ``model`` (each with its share of the
    threads), each from a cold prefix cache, in this one run; output tokens/s and the ratio,
    and the KV blocks each replica still holds after it."""
    import torch

    from mlx_serve.async_engine import AsyncEngine
    from mlx_serve.data_parallel import DataParallelEngine

    replicas = DataParallelEngine(model, size, **(engine_options or {}))
    warm = make_workload(2 * size, (8, 16), (2, 4), engine.model.config.vocab_size, 0.0, 1)

    async def both():
        alone = AsyncEngine(engine)
        alone.start()
        try:
            # first calls on a new thread cost more (measured here): warm both sides' threads
            await run_front(alone, warm)
            engine.reset_prefix_cache()
            one = await run_front(alone, workload)
        finally:
            alone.shutdown()
        replicas.start()
        await run_front(replicas, warm)  # first-call costs out, as for the engine alone
        await replicas.call(methodcaller("reset_prefix_cache"))
        return one, await run_front(replicas, workload)

    try:
        one, many = asyncio.run(both())
        held = [s.num_blocks - s.num_free_blocks for s in replicas.replica_stats]
    finally:
        replicas.shutdown()
    return {"size": size, "threads_per_replica": max(1, torch.get_num_threads() // size),
            "one_engine": one.summary(), "replicas": many.summary(),
            "ratio": round(many.tokens_per_s / one.tokens_per_s, 3),
            "leaked_blocks_per_replica": held}



def run_tensor_parallel(model: str, workload: Workload, size: int, one: RunResult,
                        engine_options: dict | None = None) -> dict:
    """The all-at-once workload through a ``size``-way tensor-parallel engine (its workers
    started by this process, each rank with its share of the threads), against ``one`` (the
    same workload through the one-process engine, in this run): output tokens/s, the ratio, and
    rank 0's time in collectives (all-reduces, the logits' gather) per step."""
    from mlx_serve.llm import LLM

    with LLM(model, tensor_parallel_size=size, **(engine_options or {})) as llm:
        engine = llm.engine
        vocab = engine.model.config.vocab_size
        run_engine(engine, make_workload(2, (8, 16), (2, 4), vocab, 0.0, 1), use_arrivals=False)
        spent = engine.parallel.time
        before_s, before_calls = spent.seconds, spent.calls
        result = run_engine(engine, workload, use_arrivals=False)
        seconds, calls = spent.seconds - before_s, spent.calls - before_calls
        threads = torch.get_num_threads()
        leaked = engine.blocks.num_blocks - engine.blocks.num_free_blocks
    return {"size": size, "threads_per_rank": threads, "one_process": one.summary(),
            "tensor_parallel": result.summary(),
            "ratio": round(result.tokens_per_s / one.tokens_per_s, 3),
            "collective_ms_per_step": round(1000 * seconds / result.steps, 3),
            "collectives_per_step": round(calls / result.steps, 1),
            "collective_share_of_run": round(seconds / result.seconds, 4),
            "leaked_blocks": leaked}


def run_hf(hf_model, workload: Workload, batch_size: int, pad_token_id: int) -> RunResult:
    """Static batches in arrival order, left-padded, each batch as long as its longest request."""
    useful, start = 0, time.monotonic()
    for first in range(0, len(workload.prompts), batch_size):
        prompts = workload.prompts[first:first + batch_size]
        wanted = workload.output_lens[first:first + batch_size]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        new = max(wanted)
        with torch.inference_mode():
            out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                    min_new_tokens=new, do_sample=False, pad_token_id=pad_token_id)
        assert out.shape[1] == width + new, "HF generate stopped early; the baseline is invalid"
        useful += sum(wanted)
    return RunResult(useful, time.monotonic() - start)


def run_prefix_caching(engine: LLMEngine, vocab_size: int, system_len: int = 200,
                       num_requests: int = 5, rounds: int = 3, seed: int = 1) -> dict:
    """A shared system prompt, then short user turns one after another: TTFT of each. Each
    round has a new system prompt (cold in the prefix cache); medians over the rounds, since one
    cold request's TTFT on a shared machine can be off by a third."""
    rng = random.Random(seed)
    low_id = min(100, vocab_size // 2)
    firsts, laters = [], []
    for round_ in range(rounds):
        system = [rng.randrange(low_id, vocab_size) for _ in range(system_len)]
        ttfts = []
        for i in range(num_requests):
            user = [rng.randrange(low_id, vocab_size) for _ in range(16)]
            engine.add_request(system + user, SamplingParams(temperature=0, max_tokens=1,
                                                             ignore_eos=True),
                               request_id=f"prefix-{round_}-{i}")
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        ttfts.append(out.metrics.first_token_time - out.metrics.arrival_time)
        firsts.append(ttfts[0])
        laters += ttfts[1:]
    first, later = statistics.median(firsts), statistics.median(laters)
    return {"system_prompt_tokens": system_len, "rounds": rounds,
            "first_ttft_ms": round(1000 * first, 1), "later_ttft_median_ms": round(1000 * later, 1),
            "later_over_first": round(later / first, 3)}


def matmul_gflops(size: int = 1024, repeats: int = 10) -> float:
    """This machine's fp32 matmul rate, the compute ceiling's yardstick."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def flops_per_token(model) -> float:
    """2 x the weights of the linear layers a token's forward multiplies by (quantized ones
    included; an untied embedding is a lookup, not a matmul; norms are negligible)."""
    from torch import nn

    from mlx_core.transforms import QuantizedLinear

    return 2.0 * sum(m.in_features * m.out_features for m in model.modules()
                     if isinstance(m, (nn.Linear, QuantizedLinear)))


def run(model: str = "smollm2-135m-instruct", *, num_requests: int = 64,
        prompt_len: tuple[int, int] = (32, 256), output_len: tuple[int, int] = (16, 128),
        request_rate: float = 4.0, hf_batch_sizes: tuple[int, ...] = (8, 16), seed: int = 0,
        engine_options: dict | None = None, structured_fraction: float = 0.0,
        data_parallel_size: int = 1, tensor_parallel_size: int = 1) -> dict:
    from transformers import AutoModelForCausalLM

    from mlx_serve.llm import LLM

    torch.manual_seed(seed)
    llm = LLM(model, **(engine_options or {}))
    engine, zoo = llm.engine, llm.engine.model
    vocab = zoo.config.vocab_size
    workload = make_workload(num_requests, prompt_len, output_len, vocab, request_rate, seed)
    warm = make_workload(2, (8, 16), (2, 4), vocab, 0.0, seed + 1)
    run_engine(engine, warm, use_arrivals=False)  # first-call costs (allocator, kernels) out

    drafted, kept = engine.num_draft_tokens, engine.num_accepted_tokens
    all_at_once = run_engine(engine, workload, use_arrivals=False)
    drafted, kept = engine.num_draft_tokens - drafted, engine.num_accepted_tokens - kept
    structured = (run_structured(engine, workload, structured_fraction, all_at_once)
                  if structured_fraction > 0 else None)
    # the same prompts again: from a cold prefix cache, or every prompt would be a cache hit
    engine.reset_prefix_cache()
    at_rate = run_engine(engine, workload, use_arrivals=True) if request_rate > 0 else None
    leaked = engine.blocks.num_blocks - engine.blocks.num_free_blocks
    fresh = LLM(zoo, tokenizer=engine.tokenizer, **(engine_options or {}))  # cold prefix cache
    prefix = run_prefix_caching(fresh.engine, vocab)
    del fresh
    data_parallel = (run_data_parallel(model, engine, workload, data_parallel_size,
                                       engine_options) if data_parallel_size > 1 else None)
    tensor_parallel = (run_tensor_parallel(model, workload, tensor_parallel_size, all_at_once,
                                           engine_options) if tensor_parallel_size > 1 else None)

    hf = AutoModelForCausalLM.from_pretrained(zoo.source_dir, dtype=torch.float32).eval()
    pad = engine.tokenizer.pad_token_id
    pad = pad if pad is not None else engine.tokenizer.eos_token_id
    run_hf(hf, warm, 2, pad)
    baseline = {bs: run_hf(hf, workload, bs, pad) for bs in hf_batch_sizes}
    best_bs = max(baseline, key=lambda bs: baseline[bs].tokens_per_s)

    gflops = matmul_gflops()
    per_token = flops_per_token(zoo)
    ceiling = gflops * 1e9 / per_token
    prompt_tokens = sum(map(len, workload.prompts))
    processed = (prompt_tokens + all_at_once.output_tokens) / all_at_once.seconds
    return {
        "model": model, "num_requests": num_requests, "prompt_len": list(prompt_len),
        "output_len": list(output_len), "request_rate": request_rate, "seed": seed,
        "prompt_tokens": prompt_tokens, "threads": torch.get_num_threads(),
        "mlx_all_at_once": all_at_once.summary(),
        "mlx_at_request_rate": at_rate.summary() if at_rate else None,
        "hf_static_batches": {str(bs): r.summary() for bs, r in baseline.items()},
        "hf_best_batch_size": best_bs,
        "throughput_ratio": round(all_at_once.tokens_per_s / baseline[best_bs].tokens_per_s, 2),
        "matmul_gflops": round(gflops, 1), "gflop_per_token": round(per_token / 1e9, 3),
        "ceiling_output_tokens_per_s": round(ceiling, 1),
        "fraction_of_ceiling_output": round(all_at_once.tokens_per_s / ceiling, 3),
        "fraction_of_ceiling_all_tokens": round(processed / ceiling, 3),
        "prefix_caching": prefix, "leaked_blocks": leaked, "structured": structured,
        "data_parallel": data_parallel, "tensor_parallel": tensor_parallel,
        "speculative": {"config": asdict(engine.config.speculative_config),
                        "draft_tokens": drafted,
                        "accepted_tokens": kept,
                        "acceptance_rate": round(kept / drafted, 3) if drafted else 0.0}
        if engine.config.speculative_config else None,
        "engine": asdict(engine.config),
    }


def run_structured(engine: LLMEngine, workload: Workload, fraction: float,
                   free: RunResult) -> dict:
    """The all-at-once workload again (cold prefix cache) with ``fraction`` of its requests
    constrained to ``STRUCTURED_SCHEMA``: the grammar's share of the run (masking in the
    sampler), and the mean step time against ``free`` (the same workload unconstrained)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--structured-fraction must be in (0, 1] (got {fraction})")
    every = max(1, round(1 / fraction))
    engine.reset_prefix_cache()
    before = engine.sampler.grammar_seconds
    run = run_engine(engine, workload, use_arrivals=False, guided={"json": STRUCTURED_SCHEMA},
                     guided_every=every)
    grammar = engine.sampler.grammar_seconds - before
    step_ms, free_step_ms = 1000 * run.seconds / run.steps, 1000 * free.seconds / free.steps
    return {"fraction": round(1 / every, 3), "schema": STRUCTURED_SCHEMA,
            "run": run.summary(), "grammar_seconds": round(grammar, 6),
            "grammar_share_of_run": round(grammar / run.seconds, 6),
            "step_ms": round(step_ms, 2), "unconstrained_step_ms": round(free_step_ms, 2),
            "step_time_ratio": round(step_ms / free_step_ms, 3)}


def int8_matmul_tops(size: int = 1024, repeats: int = 10, qmax: int = 127) -> float:
    """This machine's rate for W8A8's own int8 x int8 -> int32 product, its ceiling: the
    ``w8a8_linear`` that a W8A8 layer runs on ``size`` rows (``torch._int_mm``, oneDNN's packed
    weight with AMX, or the native GEMM on a CPU without VNNI, whose ``torch._int_mm`` runs a
    reference loop), the rows' quantization and scaling included. ``qmax``: the weights' range
    (W7A8's narrow one takes the narrow GEMM where the CPU has no VNNI)."""
    from mlx_kernels.quantized_linear import CpuLayout, quantize_int8, w8a8_linear

    x = torch.randn(size, size)
    qweight, scale = quantize_int8(torch.randn(size, size), qmax=qmax)
    layout = CpuLayout()
    with torch.inference_mode():
        w8a8_linear(x, qweight, scale, cpu_layout=layout)
        start = time.perf_counter()
        for _ in range(repeats):
            w8a8_linear(x, qweight, scale, cpu_layout=layout)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


FUSION_CHOICES = ("on", "off", "both")


def run_quantized(model: str = "smollm2-135m-instruct", *, schemes: tuple[str, ...] = ("w8a8",),
                  num_requests: int = 64, prompt_len: tuple[int, int] = (32, 256),
                  output_len: tuple[int, int] = (16, 128), rounds: int = 1, seed: int = 0,
                  engine_options: dict | None = None, fusion: str = "on",
                  kv_cache_dtypes: tuple[str, ...] = ()) -> dict:
    """The serving workload of ``run`` (all requests at once) on our engine in fp32 and on each
    quantization scheme, in one process (rounds interleaved, each from a cold prefix cache, the
    best kept), reported as ratios to fp32, with the fraction of the machine's fp32 GEMM ceiling
    (fp32 and weight-only schemes, whose large GEMMs run in fp32) or int8 GEMM ceiling (W8A8)
    reached, counting prompt and output tokens. ``fusion``: the engines with fused q/k/v and
    gate/up (``on``, as ``mlx serve`` runs), without (``off``), or ``both``: each scheme also
    unfused (``"<scheme> unfused"``), the ratio still to fused fp32. ``kv_cache_dtypes``: each
    engine also over a KV cache of each of these types (``"<scheme> kv float16"``; the others
    keep the model's fp32 cache), the ratio still to fp32 with its fp32 cache."""
    from mlx_serve.llm import LLM

    if fusion not in FUSION_CHOICES:
        raise ValueError(f"fusion must be one of {', '.join(FUSION_CHOICES)}, got {fusion!r}")
    options = {"kv_cache_memory": "1GiB", **(engine_options or {})}
    engines = {}
    for scheme in ("fp32", *schemes):
        quantization = None if scheme == "fp32" else scheme
        for fused in {"on": (True,), "off": (False,), "both": (True, False)}[fusion]:
            name = scheme if fused or fusion == "off" else f"{scheme} unfused"
            for kv_dtype in ("auto", *kv_cache_dtypes):
                label = name if kv_dtype == "auto" else f"{name} kv {kv_dtype}"
                engines[label] = LLM(model, quantization=quantization, fuse_projections=fused,
                                     kv_cache_dtype=kv_dtype, **options).engine
    vocab = engines["fp32"].model.config.vocab_size
    workload = make_workload(num_requests, prompt_len, output_len, vocab, 0.0, seed)
    warm = make_workload(2, (8, 16), (2, 4), vocab, 0.0, seed + 1)
    best: dict[str, RunResult] = {}
    for engine in engines.values():
        run_engine(engine, warm, use_arrivals=False)
    for _ in range(rounds):
        for name, engine in engines.items():
            engine.reset_prefix_cache()
            result = run_engine(engine, workload, use_arrivals=False)
            if name not in best or result.tokens_per_s > best[name].tokens_per_s:
                best[name] = result
    from mlx_kernels.quantized_linear import NARROW_QMAX, cpu_kernels

    gflops, tops = matmul_gflops(), int8_matmul_tops()
    narrow = any(name.split()[0] == "w7a8" for name in best)
    narrow_tops = int8_matmul_tops(qmax=NARROW_QMAX) if narrow else None
    per_token = flops_per_token(engines["fp32"].model)
    prompt_tokens = sum(map(len, workload.prompts))
    out = {"model": model, "num_requests": num_requests, "prompt_tokens": prompt_tokens,
           "threads": torch.get_num_threads(), "cpu": cpu_kernels(), "rounds": rounds,
           "matmul_gflops": round(gflops, 1), "int8_matmul_tops": round(tops, 2),
           **({"int8_narrow_matmul_tops": round(narrow_tops, 2)} if narrow else {}),
           "gflop_per_token": round(per_token / 1e9, 3), "fusion": fusion, "schemes": {}}
    # each engine's GEMM ceiling (ops/s): W8A8's and W7A8's int8 GEMMs, the rest's fp32 one
    ceilings = {"w8a8": ("int8", tops * 1e12), "w7a8": ("int8 narrow", (narrow_tops or 0) * 1e12)}
    for name, result in best.items():
        kind, rate = ceilings.get(name.split()[0], ("fp32", gflops * 1e9))
        ceiling = rate / per_token
        processed = (prompt_tokens + result.output_tokens) / result.seconds
        out["schemes"][name] = {
            **result.summary(),
            "ratio_to_fp32": round(result.tokens_per_s / best["fp32"].tokens_per_s, 3),
            "ceiling": kind,
            "fraction_of_ceiling_all_tokens": round(processed / ceiling, 3),
            "leaked_blocks": engines[name].blocks.num_blocks - engines[name].blocks.num_free_blocks}
    return out
