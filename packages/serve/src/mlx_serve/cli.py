"""``mlx serve``: the OpenAI-compatible server over one model."""

from __future__ import annotations

import logging

import typer

from mlx_core.cli.errors import clean_errors
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
          max_model_len: int | None = typer.Option(
              None, "--max-model-len", help="Prompt + output tokens at most (default: the "
              "model's context length)."),
          max_waiting_seqs: int | None = typer.Option(
              None, "--max-waiting-seqs",
              help="Answer 503 (Retry-After) when this many sequences already wait."),
          dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
          device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
          log_level: str = typer.Option("info", "--log-level")):
    """Serve MODEL over HTTP with the OpenAI API (/v1/completions, /v1/chat/completions,
    /v1/models, /health, /metrics). Ctrl-C stops it, aborting unfinished requests."""
    from mlx_serve.llm import LLM
    from mlx_serve.server import build_app, run_server

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    options = dict(max_num_seqs=max_num_seqs, block_size=block_size, max_model_len=max_model_len)
    if kv_cache_memory is not None:
        options["kv_cache_memory"] = kv_cache_memory
    engine = LLM(model, dtype=dtype, device=device, **options).engine
    name = served_model_name or model
    app = build_app(engine, name, api_key=api_key, max_waiting_seqs=max_waiting_seqs)
    blocks = engine.blocks
    typer.echo(f"serving {name!r} on http://{host}:{port}/v1 ({blocks.num_blocks} KV blocks of "
               f"{blocks.block_size} tokens, max_model_len {engine.max_model_len})")
    run_server(app, host, port, log_level.lower())
