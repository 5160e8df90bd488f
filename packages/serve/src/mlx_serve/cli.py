"""``mlx serve``: the OpenAI-compatible server over one model."""

from __future__ import annotations

import logging

import typer

from mlx_core.cli import clean_errors
from mlx_core.sources import BUILTIN_MODEL


@clean_errors
def serve(model: str = typer.Option(BUILTIN_MODEL, "--model", "-m",
                                    help="A registered model, an HF directory or a .gguf file."),
          host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
          port: int = typer.Option(8000, "--port", help="Port to listen on."),
          api_key: str | None = typer.Option(
              None, "--api-key", envvar="MLX_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/* (default: $MLX_API_KEY)."),
          served_model_name: str | None = typer.Option(
              None, "--served-model-name", help="The name clients ask for (default: --model)."),
          kv_cache_memory: str | None = typer.Option(
              None, "--kv-cache-memory",
              help="KV-cache size, e.g. 2GiB (default: a quarter of the free memory)."),
          max_num_seqs: int = typer.Option(64, "--max-num-seqs",
                                           help="Sequences in one batch at most."),
          block_size: int = typer.Option(16, "--block-size", help="Tokens per KV block."),
          max_num_batched_tokens: int = typer.Option(
              2048, "--max-num-batched-tokens", min=1,
              help="Tokens in one forward at most (decodes + prompt chunks)."),
          enable_prefix_caching: bool = typer.Option(
              True, "--enable-prefix-caching/--no-enable-prefix-caching",
              help="Reuse the keys/values of a prompt's already computed prefix."),
          enable_chunked_prefill: bool = typer.Option(
              True, "--enable-chunked-prefill/--no-enable-chunked-prefill",
              help="Split long prompts over steps (off: a prompt must fit one step's tokens)."),
          prepack_weights: bool = typer.Option(
              True, "--prepack-weights/--no-prepack-weights",
              help="CPU fp32: a packed copy of each linear weight for faster GEMMs (as much "
              "memory again as the linear weights)."),
          fuse_projections: bool = typer.Option(
              True, "--fuse-projections/--no-fuse-projections",
              help="q/k/v and gate/up as one GEMM each (the same logits; a LoRA adapter splits "
                   "the layers it targets again)."),
          scheduling_policy: str = typer.Option(
              "fcfs", "--scheduling-policy",
              help="fcfs, or priority: requests' 'priority' field (lower first) orders admission "
              "and preemption."),
          max_model_len: int | None = typer.Option(
              None, "--max-model-len", help="Prompt + output tokens at most (default: the "
              "model's context length)."),
          speculative_config: str | None = typer.Option(
              None, "--speculative-config",
              help='Speculative decoding, as JSON (vLLM\'s form): {"method": "ngram", '
              '"num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}.'),
          max_waiting_seqs: int | None = typer.Option(
              None, "--max-waiting-seqs",
              help="Answer 503 (Retry-After) when this many sequences already wait."),
          lora: list[str] = typer.Option(
              [], "--lora", help="NAME=DIR: serve a PEFT LoRA adapter as model NAME (repeat for "
              "more); requests for different adapters share batches."),
          max_loras: int = typer.Option(4, "--max-loras", help="LoRA adapters loaded at once."),
          max_lora_rank: int = typer.Option(64, "--max-lora-rank"),
          allow_runtime_lora: bool = typer.Option(
              False, "--allow-runtime-lora",
              help="Enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter."),
          quantization: str | None = typer.Option(
              None, "--quantization", "-q",
              help="Quantize the weights at start: int8, int4 (int4-g64, int4-g128) or w8a8; "
                   "LoRA adapters stay in full precision (docs/quantization.md)."),
          kv_cache_dtype: str = typer.Option(
              "auto", "--kv-cache-dtype",
              help="The KV cache's type: auto (the model's), or float16 / bfloat16 under an fp32 "
                   "model on CPU: twice the blocks in the same memory, half the bytes read "
                   "(docs/serve.md)."),
          tool_call_parser: str = typer.Option(
              "hermes", "--tool-call-parser",
              help="How the model writes tool calls: hermes (<tool_call> JSON blocks) or "
                   "llama3_json (a JSON object per call)."),
          pooling: str = typer.Option(
              "last", "--pooling",
              help="/v1/embeddings: the last token's final hidden state, or the mean over the "
                   "input's tokens (last, mean); unit length either way."),
          ui: bool = typer.Option(True, "--ui/--no-ui",
                                  help="The playground page at / (chat, arena, engine panel)."),
          dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
          device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
          data_parallel_size: int = typer.Option(
              1, "--data-parallel-size", "-dp", min=1,
              help="Engines (replicas), each with its own KV cache in a process of its own, "
                   "behind this one server; requests go to the replica caching their prefix, "
                   "else the one with the most free KV blocks (docs/serve.md, Scale-out)."),
          tensor_parallel_size: int = typer.Option(
              1, "--tensor-parallel-size", "-tp", min=1,
              help="Split the model over this many processes (tensor parallelism: each holds its "
                   "share of the weights and KV heads; gloo on CPU, NCCL on GPU)."),
          nnodes: int = typer.Option(1, "--nnodes", min=1,
                                     help="Machines the tensor-parallel ranks run on."),
          node_rank: int = typer.Option(
              0, "--node-rank", min=0,
              help="This machine's place among --nnodes: 0 runs the engine and the server, the "
                   "others only their share of the ranks."),
          master_addr: str = typer.Option(
              "127.0.0.1", "--master-addr", help="Node 0's address, where the ranks meet."),
          master_port: int | None = typer.Option(
              None, "--master-port", help="The port the ranks meet at (default, one node: a free "
                                          "one)."),
          log_level: str = typer.Option("info", "--log-level")):
    """Serve MODEL over HTTP with the OpenAI API (/v1/completions, /v1/chat/completions,
    /v1/embeddings, /v1/models, /health, /metrics) and the playground page at /. Ctrl-C stops
    it, aborting unfinished requests."""
    from mlx_serve.tools import check_parser

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    options = dict(max_num_seqs=max_num_seqs, block_size=block_size, max_model_len=max_model_len,
                   max_num_batched_tokens=max_num_batched_tokens,
                   enable_prefix_caching=enable_prefix_caching,
                   enable_chunked_prefill=enable_chunked_prefill,
                   scheduling_policy=scheduling_policy, max_loras=max_loras,
                   max_lora_rank=max_lora_rank, prepack_weights=prepack_weights,
                   fuse_projections=fuse_projections, quantization=quantization, pooling=pooling,
                   kv_cache_dtype=kv_cache_dtype)
    if kv_cache_memory is not None:
        options["kv_cache_memory"] = kv_cache_memory
    if speculative_config is not None:
        options["speculative_config"] = _json_option(speculative_config, "--speculative-config")
    check_parser(tool_call_parser)  # before the model loads
    if tensor_parallel_size > 1 and data_parallel_size > 1 and device != "cpu":
        # replica i takes GPU i; its ranks would need GPUs of their own: no plan for that yet
        raise typer.BadParameter("--data-parallel-size with --tensor-parallel-size runs on the "
                                 "CPU only for now; on GPUs choose one of them")
    options.update(tensor_parallel_size=tensor_parallel_size, nnodes=nnodes,
                   master_addr=master_addr, master_port=master_port)
    if node_rank > 0:
        return _serve_node(model, options, node_rank, dtype=dtype, device=device)
    _serve_model(model, served_model_name, lora, options, host=host, port=port, api_key=api_key,
                 dtype=dtype, device=device, log_level=log_level, ui=ui,
                 max_waiting_seqs=max_waiting_seqs, allow_runtime_lora=allow_runtime_lora,
                 tool_call_parser=tool_call_parser, data_parallel_size=data_parallel_size)


@clean_errors
def playground(model: str = typer.Argument(BUILTIN_MODEL,
                                           help="A registered model, an HF directory or a .gguf "
                                                "file."),
               lora: list[str] = typer.Option(
                   [], "--lora", help="NAME=DIR: a PEFT LoRA adapter to chat with beside the "
                   "base (repeat for more)."),
               host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
               port: int = typer.Option(8000, "--port", help="Port to listen on."),
               api_key: str | None = typer.Option(
                   None, "--api-key", envvar="MLX_API_KEY",
                   help="Require 'Authorization: Bearer KEY' on /v1/* (the page opened here "
                        "carries it)."),
               quantization: str | None = typer.Option(
                   None, "--quantization", "-q", help="int8, int4 or w8a8, as mlx serve's."),
               kv_cache_memory: str | None = typer.Option(
                   None, "--kv-cache-memory", help="KV-cache size, e.g. 2GiB."),
               open_browser: bool = typer.Option(
                   True, "--open/--no-open", help="Open the page in the default browser."),
               dtype: str = typer.Option("float32", "--dtype"),
               device: str = typer.Option("cpu", "--device"),
               log_level: str = typer.Option("warning", "--log-level")):
    """Chat with MODEL and its LoRA adapters in the browser: starts `mlx serve` (adapters
    loadable at run time) and opens the playground page, where arena mode sends one prompt to
    the base and adapters side by side in one batch. Ctrl-C stops it."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    options = {"quantization": quantization}
    if kv_cache_memory is not None:
        options["kv_cache_memory"] = kv_cache_memory
    url = f"http://{host}:{port}/" + (f"#api_key={api_key}" if api_key else "")
    _serve_model(model, None, lora, options, host=host, port=port, api_key=api_key, dtype=dtype,
                 device=device, log_level=log_level, ui=True, allow_runtime_lora=True,
                 on_ready=lambda: _open_page(url, open_browser))


def _serve_model(model: str, served_model_name: str | None, lora: list[str], options: dict, *,
                 host: str, port: int, api_key: str | None, dtype: str, device: str,
                 log_level: str, ui: bool, on_ready=None, data_parallel_size: int = 1,
                 **app_options) -> None:
    """Load ``model`` with its ``--lora`` adapters into an engine (``data_parallel_size`` > 1:
    that many replicas, ``mlx_serve.data_parallel``) and serve it until Ctrl-C; ``on_ready`` is
    called (in a thread) once the server answers."""
    from mlx_serve.llm import LLM
    from mlx_serve.server import build_app, run_server

    loras = dict(_lora_option(spec) for spec in lora)
    name = served_model_name or model
    if name in loras:
        raise typer.BadParameter(f"--lora {name}=...: the adapter name is the model's name; "
                                 "choose another")
    if data_parallel_size > 1:
        from mlx_serve.data_parallel import DataParallelEngine

        engine = DataParallelEngine(model, data_parallel_size, dtype=dtype, device=device,
                                    loras=loras, **options)
    else:
        engine = LLM(model, dtype=dtype, device=device, loras=loras, **options).engine
    app = build_app(engine, name, api_key=api_key, ui=ui, **app_options)
    facts = app.state.engine.engine
    blocks = facts.blocks
    typer.echo(f"serving {name!r} on http://{host}:{port}/v1 ({blocks.num_blocks} KV blocks of "
               f"{blocks.block_size} tokens, max_model_len {facts.max_model_len})")
    if getattr(facts, "parallel", None) is not None:
        typer.echo(f"tensor parallelism: {facts.parallel.world_size} ranks (worker pids "
                   f"{', '.join(str(p.pid) for p in facts.parallel.processes)})")
    if data_parallel_size > 1:
        typer.echo(f"data-parallel replicas: {data_parallel_size} (pids "
                   f"{', '.join(map(str, engine.pids))}), KV blocks each: "
                   f"{', '.join(str(s.num_blocks) for s in engine.replica_stats)}")
    if loras:
        typer.echo(f"LoRA adapters: {', '.join(loras)}")
    if ui:
        typer.echo(f"playground: http://{host}:{port}/")
    if on_ready is not None:
        _when_listening(host, port, on_ready)
    run_server(app, host, port, log_level.lower())


def _serve_node(model: str, options: dict, node_rank: int, *, dtype: str, device: str) -> None:
    """``mlx serve --node-rank K`` (K > 0): this machine's tensor-parallel ranks, no server;
    exits when node 0's engine stops them."""
    from mlx_core import load_model
    from mlx_serve.config import EngineConfig
    from mlx_serve.engine import default_dtype
    from mlx_serve.tensor_parallel import run_node

    config = EngineConfig(**options)
    lm = load_model(model, dtype=default_dtype(dtype), device=device).eval()
    typer.echo(f"node {node_rank} of {config.nnodes}: ranks of a {config.tensor_parallel_size}-way "
               f"tensor-parallel engine, joining {config.master_addr}:{config.master_port}")
    code = run_node(lm, config, node_rank)
    if code:
        raise typer.Exit(code)


def _when_listening(host: str, port: int, callback, timeout_s: float = 120.0) -> None:
    """Call ``callback`` from a daemon thread once ``host:port`` accepts connections."""
    import socket
    import threading
    import time

    def wait():
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((host, port), timeout=1):
                    return callback()
            except OSError:
                time.sleep(0.2)

    threading.Thread(target=wait, daemon=True, name="mlx-playground-open").start()


def _open_page(url: str, open_browser: bool) -> None:
    import webbrowser

    shown = url.split("#")[0]
    if open_browser and webbrowser.open(url):
        typer.echo(f"opened {shown} in the browser")
    else:
        typer.echo(f"open {shown} in a browser" + (" (the API key travels in the URL's "
                                                    "#fragment)" if "#" in url else ""))


def _lora_option(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise typer.BadParameter(f"--lora takes NAME=DIR, e.g. --lora sql=./adapters/sql; got "
                                 f"{spec!r}")
    return name, path


def _json_option(text: str, option: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"{option} takes a JSON object, e.g. '{{\"method\": \"ngram\", "
                                 f"\"num_speculative_tokens\": 3}}'; {e}") from None
    if not isinstance(value, dict):
        raise typer.BadParameter(f"{option} takes a JSON object, got {text!r}")
    return value


def _int_range(text: str, option: str) -> tuple[int, int]:
    try:
        low, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise typer.BadParameter(f"{option} takes LOW:HIGH, e.g. 32:256; got {text!r}") from None
    if not 1 <= low <= high:
        raise typer.BadParameter(f"{option} needs 1 <= LOW <= HIGH; got {text!r}")
    return low, high


@clean_errors
def bench_serve(model: str = typer.Option(BUILTIN_MODEL, "--model", "-m"),
                num_requests: int = typer.Option(64, "--num-requests", min=1),
                prompt_len: str = typer.Option("32:256", "--prompt-len",
                                               help="Prompt lengths, uniform in LOW:HIGH."),
                output_len: str = typer.Option("16:128", "--output-len",
                                               help="Output lengths, uniform in LOW:HIGH."),
                request_rate: float = typer.Option(
                    4.0, "--request-rate", min=0,
                    help="Poisson arrivals per second for the second run (0: skip it)."),
                hf_batch_sizes: str = typer.Option("8,16", "--hf-batch-sizes",
                                                   help="HF static batch sizes; the best counts."),
                kv_cache_memory: str | None = typer.Option(None, "--kv-cache-memory"),
                max_num_seqs: int = typer.Option(64, "--max-num-seqs"),
                seed: int = typer.Option(0, "--seed"),
                speculative_config: str | None = typer.Option(
                    None, "--speculative-config",
                    help="Our engine with speculative decoding, as mlx serve's option."),
                prepack_weights: bool = typer.Option(
                    True, "--prepack-weights/--no-prepack-weights",
                    help="Our engine with/without prepacked linear weights, as mlx serve's."),
                fuse_projections: bool = typer.Option(
                    True, "--fuse-projections/--no-fuse-projections",
                    help="Our engine with/without fused q/k/v and gate/up, as mlx serve's."),
                quantization: str | None = typer.Option(
                    None, "--quantization", "-q",
                    help="Our engine on quantized weights (int8, int4, w8a8), as mlx serve's."),
                kv_cache_dtype: str = typer.Option(
                    "auto", "--kv-cache-dtype",
                    help="Our engine's KV-cache type (auto, float16, bfloat16), as mlx serve's."),
                structured_fraction: float = typer.Option(
                    0.0, "--structured-fraction", min=0, max=1,
                    help="Also run the workload with this fraction of its requests constrained "
                         "to a JSON schema: the grammar masking's share of the run."),
                data_parallel_size: int = typer.Option(
                    1, "--data-parallel-size", "-dp", min=1,
                    help="Also run the workload (all at once) through the server's front on "
                         "this many replicas and on our engine alone: output tok/s, ratio."),
                tensor_parallel_size: int = typer.Option(
                    1, "--tensor-parallel-size", "-tp", min=1,
                    help="Also run the workload (all at once) through an engine split over "
                         "this many processes: output tok/s against one process, and the "
                         "all-reduce time per step."),
                json_path: str = typer.Option("", "--json", help="Also write the result here.")):
    """Serving throughput, TTFT and TPOT: the engine vs HF transformers generate in static
    batches, same seeded workload, same process; prints the ratio."""
    import json

    from rich.console import Console
    from rich.table import Table

    from mlx_serve import bench

    try:
        batch_sizes = tuple(int(b) for b in hf_batch_sizes.split(","))
    except ValueError:
        raise typer.BadParameter(f"--hf-batch-sizes takes e.g. 8,16; got {hf_batch_sizes!r}") \
            from None
    options = {"max_num_seqs": max_num_seqs, "prepack_weights": prepack_weights,
               "fuse_projections": fuse_projections, "quantization": quantization,
               "kv_cache_dtype": kv_cache_dtype}
    if kv_cache_memory is not None:
        options["kv_cache_memory"] = kv_cache_memory
    if speculative_config is not None:
        options["speculative_config"] = _json_option(speculative_config, "--speculative-config")
    result = bench.run(model, num_requests=num_requests,
                       prompt_len=_int_range(prompt_len, "--prompt-len"),
                       output_len=_int_range(output_len, "--output-len"),
                       request_rate=request_rate, hf_batch_sizes=batch_sizes, seed=seed,
                       engine_options=options, structured_fraction=structured_fraction,
                       data_parallel_size=data_parallel_size,
                       tensor_parallel_size=tensor_parallel_size)
    table = Table("run", "output tok/s", "seconds", "TTFT p50/p99 (ms)", "TPOT p50/p99 (ms)",
                  title=f"mlx bench serve: {model}, {num_requests} requests, prompts "
                        f"{prompt_len}, outputs {output_len}, {result['threads']} threads")
    runs = [("mlx, all at once", result["mlx_all_at_once"])]
    if result["mlx_at_request_rate"]:
        runs.append((f"mlx, {request_rate} req/s", result["mlx_at_request_rate"]))
    runs += [(f"HF generate, batch {bs}", r) for bs, r in result["hf_static_batches"].items()]
    for name, r in runs:
        ttft = f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f}" if "ttft_p50_ms" in r else "-"
        tpot = f"{r['tpot_p50_ms']:.0f} / {r['tpot_p99_ms']:.0f}" if "tpot_p50_ms" in r else "-"
        table.add_row(name, f"{r['output_tokens_per_s']:.1f}", f"{r['seconds']:.1f}", ttft, tpot)
    Console().print(table)
    prefix = result["prefix_caching"]
    print(f"throughput ratio (mlx / best HF batch {result['hf_best_batch_size']}): "
          f"{result['throughput_ratio']}x")
    print(f"compute ceiling: {result['matmul_gflops']} GFLOP/s / {result['gflop_per_token']} "
          f"GFLOP per token = {result['ceiling_output_tokens_per_s']} tok/s; reached "
          f"{result['fraction_of_ceiling_output']:.0%} in output tokens, "
          f"{result['fraction_of_ceiling_all_tokens']:.0%} counting prompt tokens")
    print(f"prefix caching ({prefix['system_prompt_tokens']}-token shared system prompt, medians "
          f"of {prefix['rounds']} rounds): TTFT first {prefix['first_ttft_ms']} ms, later "
          f"{prefix['later_ttft_median_ms']} ms ({prefix['later_over_first']}x)")
    if result["speculative"]:
        spec = result["speculative"]
        print(f"speculative decoding ({spec['config']}): {spec['accepted_tokens']} of "
              f"{spec['draft_tokens']} draft tokens kept ({spec['acceptance_rate']:.0%}) in the "
              "all-at-once run")
    if result["structured"]:
        st = result["structured"]
        print(f"structured outputs ({st['fraction']:.0%} of the requests constrained to a JSON "
              f"schema): grammar masking {1000 * st['grammar_seconds']:.2f} ms = "
              f"{st['grammar_share_of_run']:.2%} of the run; mean step {st['step_ms']} ms vs "
              f"{st['unconstrained_step_ms']} ms unconstrained ({st['step_time_ratio']}x)")
    if result["data_parallel"]:
        dp = result["data_parallel"]
        print(f"data-parallel ({dp['size']} replicas, {dp['threads_per_replica']} threads each; "
              f"all at once through the server's front): {dp['replicas']['output_tokens_per_s']}"
              f" output tok/s against {dp['one_engine']['output_tokens_per_s']} for one engine "
              f"with {result['threads']} threads ({dp['ratio']}x); KV blocks still held per "
              f"replica: {dp['leaked_blocks_per_replica']}")
    if result["tensor_parallel"]:
        tp = result["tensor_parallel"]
        print(f"tensor-parallel ({tp['size']} ranks, {tp['threads_per_rank']} threads each; all "
              f"at once): {tp['tensor_parallel']['output_tokens_per_s']} output tok/s against "
              f"{tp['one_process']['output_tokens_per_s']} for one process with "
              f"{result['threads']} threads ({tp['ratio']}x); collectives "
              f"{tp['collective_ms_per_step']} ms per step ({tp['collectives_per_step']} calls, "
              f"{tp['collective_share_of_run']:.1%} of the run); KV blocks still held: "
              f"{tp['leaked_blocks']}")
    print(f"KV blocks still held after the runs: {result['leaked_blocks']}")
    if json_path:
        with open(json_path, "w") as f:
            f.write(json.dumps(result, indent=2))


@clean_errors
def bench_quant_serve(model: str = typer.Option(BUILTIN_MODEL, "--model", "-m"),
                      schemes: str = typer.Option("w8a8", "--schemes",
                                                  help="Comma-separated schemes to run beside fp32."),
                      num_requests: int = typer.Option(64, "--num-requests", min=1),
                      prompt_len: str = typer.Option("32:256", "--prompt-len"),
                      output_len: str = typer.Option("16:128", "--output-len"),
                      rounds: int = typer.Option(1, "--rounds", min=1),
                      max_num_seqs: int = typer.Option(64, "--max-num-seqs"),
                      fusion: str = typer.Option(
                          "on", "--fusion",
                          help="Fused q/k/v and gate/up in every engine (on, as mlx serve), "
                               "not (off), or both: each scheme also unfused."),
                      kv_cache_dtypes: str = typer.Option(
                          "", "--kv-cache-dtypes",
                          help="Comma-separated KV-cache types (float16, bfloat16): each engine "
                               "also over such a cache."),
                      json_path: str = typer.Option("", "--json", help="Also write the result here.")):
    """The serving workload (all requests at once) on our engine in fp32 and quantized, same
    process: output tok/s ratios and the fraction of the fp32 / int8 GEMM ceiling reached."""
    import json

    from rich.console import Console
    from rich.table import Table

    from mlx_core.transforms import parse_scheme
    from mlx_serve import bench
    from mlx_serve.config import canonical_kv_cache_dtype

    names = tuple(s.strip() for s in schemes.split(",") if s.strip())
    for name in names:
        parse_scheme(name)
    kv_names = tuple(canonical_kv_cache_dtype(s.strip()) for s in kv_cache_dtypes.split(",")
                     if s.strip())
    if fusion not in bench.FUSION_CHOICES:
        raise typer.BadParameter(f"--fusion takes {', '.join(bench.FUSION_CHOICES)}; got {fusion!r}")
    result = bench.run_quantized(model, schemes=names, num_requests=num_requests,
                                 prompt_len=_int_range(prompt_len, "--prompt-len"),
                                 output_len=_int_range(output_len, "--output-len"), rounds=rounds,
                                 engine_options={"max_num_seqs": max_num_seqs}, fusion=fusion,
                                 kv_cache_dtypes=kv_names)
    table = Table("engine", "output tok/s", "vs fp32", "seconds", "ceiling", "of ceiling",
                  title=f"mlx bench quant-serve: {model}, {num_requests} requests at once, "
                        f"{result['threads']} threads (fp32 GEMM {result['matmul_gflops']} "
                        f"GFLOP/s, int8 GEMM {result['int8_matmul_tops']} TOPS"
                        + (f", on narrow weights {result['int8_narrow_matmul_tops']} TOPS"
                           if "int8_narrow_matmul_tops" in result else "") + ")")
    for name, row in result["schemes"].items():
        table.add_row(name, f"{row['output_tokens_per_s']:.1f}", f"{row['ratio_to_fp32']:.2f}x",
                      f"{row['seconds']:.1f}", row["ceiling"],
                      f"{row['fraction_of_ceiling_all_tokens']:.0%}")
    Console().print(table)
    from mlx_kernels.quantized_linear import cpu_kernels_line

    print(f"kernels here: {cpu_kernels_line(result['cpu'])}")
    if json_path:
        with open(json_path, "w") as f:
            f.write(json.dumps(result, indent=2))
