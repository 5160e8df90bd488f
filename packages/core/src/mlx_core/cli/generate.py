"""``mlx generate`` (one prompt, streamed) and ``mlx chat`` (an interactive conversation)."""

from __future__ import annotations

import sys

import typer

from mlx_core import require_torch
from mlx_core.cli.errors import clean_errors
from mlx_core.sources import BUILTIN_MODEL

MODEL = typer.Option(BUILTIN_MODEL, "--model", "-m",
                     help="A registered model, an HF directory or a .gguf file.")
MAX_NEW = typer.Option(128, "--max-new-tokens", "-n", help="Tokens to generate at most.")
TEMPERATURE = typer.Option(0.0, "--temperature", "-t", help="0 is greedy.")
TOP_K = typer.Option(0, "--top-k", help="Sample from the k most likely tokens (0: off).")
TOP_P = typer.Option(1.0, "--top-p", help="Sample from the smallest nucleus of this mass (1: off).")
SEED = typer.Option(None, "--seed", help="Seed for reproducible sampling.")
BACKEND = typer.Option("torch", "--backend",
                       help="torch (the model zoo) or jax (mlx-jax's Flax model, jit-compiled).")
# backends other packages register (registry.generation_backends), named with their install
# command where the package is absent
BACKEND_PACKAGES = {"jax": "mlx-jax with jax and flax: install it with  pip install mlx-jax  "
                           "(from a checkout: pip install -e packages/jax_backend)",
                    "serve": "mlx-serve (its engine): install it with  pip install mlx-serve  "
                             "(from a checkout: pip install -e packages/serve)"}
QUANTIZATION = typer.Option(
    None, "--quantization", "-q",
    help="Quantize the weights as they load: int8, int4 (groups of 32; int4-g64, int4-g128) or "
         "w8a8 (int8 weights and activations). See docs/quantization.md.")
TENSOR_PARALLEL = typer.Option(
    1, "--tensor-parallel-size", "--tp", min=1,
    help="Split the model over this many processes (tensor parallelism, as mlx serve's; needs "
         "mlx-serve). Torch backend, no --compile.")
COMPILE = typer.Option(
    False, "--compile/--no-compile",
    help="Decode with the compiled fixed-shape step (torch.compile; up to a minute to compile on "
         "first use, then faster steps). Torch backend only.")


def _load(model: str, backend: str = "torch", quantization: str | None = None):
    """(model, tokenizer, its stream_generate function) for ``backend``: ``torch`` (None: mlx_core's
    own generation), or a backend another package registered (``registry.generation_backends``)."""
    from mlx_core import load_tokenizer, registry
    from mlx_core.plugins import load_plugins

    if backend != "torch":
        load_plugins()
        known = ["torch", *sorted(set(registry.generation_backends.names()) | set(BACKEND_PACKAGES))]
        if backend not in known:
            raise ValueError(f"unknown --backend {backend!r}; choose one of: {', '.join(known)}")
        if quantization is not None:
            raise ValueError(f"--quantization runs on the torch backend only; drop --backend {backend}")
        if backend not in registry.generation_backends:
            raise ImportError(f"--backend {backend} needs {BACKEND_PACKAGES[backend]}")
        try:
            loaded, stream_generate = registry.generation_backends.get(backend)(model)
        except ImportError as e:  # the package is there, the libraries it runs on are not
            raise ImportError(f"--backend {backend} needs {BACKEND_PACKAGES.get(backend, backend)} "
                              f"({e})") from None
        return loaded, load_tokenizer(model), stream_generate
    require_torch(f"running {model}")
    from mlx_core import load_model
    from mlx_core.transforms import fuse_projections

    loaded = load_model(model, quantization=quantization)
    fuse_projections(loaded)  # q/k/v and gate/up as one GEMM each: the same logits, fewer calls
    return loaded, load_tokenizer(model), None


def _options(backend: str, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
             seed: int | None, compile: bool = False) -> dict:
    if compile and backend != "torch":
        raise ValueError("--compile compiles the torch backend's decode step; --backend jax is "
                         "jit-compiled already: drop --compile")
    if backend == "jax" and seed is None and temperature > 0:
        import random  # mlx-jax samples from explicit keys only: draw a fresh seed, as torch does

        seed = random.SystemRandom().randrange(2**31)
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, seed=seed)
    return {**options, "compile": True} if compile else options


def _stream(model, tokenizer, prompt_ids, options, stream_generate=None) -> str:
    """Generate, writing text to stdout as it comes; return the whole reply.
    ``stream_generate``: the backend's (None: the torch zoo's)."""
    from mlx_core.tokenizer import IncrementalDecoder

    if stream_generate is None:
        from mlx_core import stream_generate
    decoder = IncrementalDecoder(tokenizer)
    pieces = []
    for token in stream_generate(model, prompt_ids, stop_token_ids=tokenizer.eos_token_ids, **options):
        piece = decoder.push(token)
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(pieces)


@clean_errors
def generate(prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt text."),
             model: str = MODEL, max_new_tokens: int = MAX_NEW, temperature: float = TEMPERATURE,
             top_k: int = TOP_K, top_p: float = TOP_P, seed: int | None = SEED,
             chat: bool | None = typer.Option(
                 None, "--chat/--no-chat",
                 help="Wrap the prompt in the chat template (default: when the model has one)."),
             backend: str = BACKEND, quantization: str | None = QUANTIZATION,
             compile: bool = COMPILE, tensor_parallel_size: int = TENSOR_PARALLEL):
    """Generate a continuation of PROMPT, streamed to stdout."""
    options = _options(backend, max_new_tokens, temperature, top_k, top_p, seed, compile)
    if tensor_parallel_size > 1:
        return _generate_tensor_parallel(prompt, model, chat, backend, quantization, options,
                                         tensor_parallel_size)
    lm, tokenizer, stream = _load(model, backend, quantization)
    use_chat = tokenizer.has_chat_template if chat is None else chat
    ids = (tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if use_chat
           else tokenizer.encode(prompt))
    _stream(lm, tokenizer, ids, options, stream)


def _generate_tensor_parallel(prompt: str, model: str, chat: bool | None, backend: str,
                              quantization: str | None, options: dict, size: int) -> None:
    """``mlx generate --tensor-parallel-size N``: the serving engine's tensor-parallel path
    (mlx-serve's ``serve`` generation backend), streamed as the engine steps."""
    from mlx_core import load_tokenizer, registry
    from mlx_core.plugins import load_plugins

    if backend not in ("torch", "serve") or options.get("compile"):
        raise ValueError("--tensor-parallel-size runs the torch backend's eager model: drop "
                         "--backend/--compile")
    load_plugins()
    if "serve" not in registry.generation_backends:
        raise ImportError(f"--tensor-parallel-size needs {BACKEND_PACKAGES['serve']}")
    lm, stream = registry.generation_backends.get("serve")(
        model, tensor_parallel_size=size, quantization=quantization)
    try:
        tokenizer = load_tokenizer(model)
        use_chat = tokenizer.has_chat_template if chat is None else chat
        ids = (tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if use_chat
               else tokenizer.encode(prompt))
        _stream(lm, tokenizer, ids, options, stream)
    finally:
        lm.close()


@clean_errors
def chat(model: str = MODEL, system: str | None = typer.Option(None, "--system", help="A system prompt."),
         max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n"),
         temperature: float = TEMPERATURE, top_k: int = TOP_K, top_p: float = TOP_P,
         seed: int | None = SEED, backend: str = BACKEND,
         quantization: str | None = QUANTIZATION, compile: bool = COMPILE):
    """Chat with a model. /reset clears the conversation; /exit or Ctrl-D leaves."""
    options = _options(backend, max_new_tokens, temperature, top_k, top_p, seed, compile)
    lm, tokenizer, stream = _load(model, backend, quantization)
    if not tokenizer.has_chat_template:
        raise ValueError(f"{model} has no chat template; use `mlx generate --no-chat` instead")
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.strip()
        if text == "/reset":
            messages = list(start)
            typer.echo("(conversation cleared)")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        try:
            reply = _stream(lm, tokenizer, tokenizer.apply_chat_template(messages), options, stream)
        except KeyboardInterrupt:  # Ctrl-C stops this reply and forgets the turn, not the chat
            typer.echo("\n(interrupted)")
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})


@clean_errors
def bench_quant(model: str = MODEL,
                schemes: str = typer.Option(
                    "", "--schemes", help="Comma-separated schemes to compare with fp32 (default: "
                                          "int8, int4, w8a8, and gguf for a GGUF-born model)."),
                prompt_len: int = typer.Option(256, "--prompt-len"),
                new_tokens: int = typer.Option(64, "--new-tokens"),
                rounds: int = typer.Option(3, "--rounds", help="Interleaved rounds; best kept."),
                measure_quality: bool = typer.Option(
                    True, "--quality/--no-quality",
                    help="Also perplexity and greedy agreement with fp32 (the built-in text)."),
                compile: bool = typer.Option(
                    False, "--compile/--no-compile",
                    help="Also decode by the compiled fixed-shape step (generate(compile=True)); "
                         "compiling takes up to a minute per scheme."),
                peers: bool = typer.Option(
                    True, "--peers/--no-peers",
                    help="Also CTranslate2 (float32, int8) and llama.cpp (the GGUF file) where "
                         "installed; a missing one is listed with its install command."),
                fuse: bool = typer.Option(
                    True, "--fuse/--no-fuse",
                    help="Run q/k/v and gate/up as one GEMM each in every model, as mlx generate "
                         "does (mlx_core.transforms.fuse_projections; the same logits)."),
                json_path: str = typer.Option("", "--json", help="Also write the result here.")):
    """Quantized vs fp32: single-stream decode tok/s, resident weight memory and quality."""
    import json

    from rich.console import Console
    from rich.table import Table

    require_torch("mlx bench quant")
    from mlx_core.transforms import bench

    result = bench.run(model, schemes=tuple(s.strip() for s in schemes.split(",") if s.strip())
                       or None,
                       prompt_len=prompt_len, new_tokens=new_tokens, rounds=rounds,
                       measure_quality=measure_quality, compile=compile, peers=peers, fuse=fuse)
    compiled = ["compiled tok/s", "vs fp32", "vs compiled fp32"] if compile else []
    table = Table("scheme", "decode tok/s", "vs fp32", *compiled, "weights (MiB)", "vs fp32",
                  "perplexity", "vs fp32", "greedy = fp32",
                  title=f"mlx bench quant: {model}, decode after {prompt_len} prompt tokens, "
                        f"{result['threads']} threads")
    for name, row in result["schemes"].items():
        quality = ([f"{row['perplexity']:.2f}", f"{row['perplexity_ratio']:.3f}x",
                    f"{row['greedy_token_agreement']:.0%} ({row['greedy_prompts_identical']}/32)"]
                   if "perplexity" in row else ["-"] * 3)
        speeds = ([f"{row['compiled_decode_tokens_per_s']:.1f}",
                   f"{row['compiled_decode_ratio']:.2f}x", f"{row['compiled_vs_compiled_fp32']:.2f}x"]
                  if compile else [])
        table.add_row(name, f"{row['decode_tokens_per_s']:.1f}", f"{row['decode_ratio']:.2f}x",
                      *speeds, f"{row['weight_mib']:.0f}", f"{row['weight_ratio']:.2f}x", *quality)
    Console().print(table)
    from mlx_kernels.quantized_linear import cpu_kernels_line

    print(f"kernels here: {cpu_kernels_line(result['cpu'])}")
    if result["peers"]:
        others = Table("engine", "decode tok/s", "vs our fp32", title="peers, same prompt")
        for name, row in result["peers"].items():
            if "skipped" in row or "failed" in row:
                why = "skipped" if "skipped" in row else "failed"
                others.add_row(name, why, row[why])
            else:
                others.add_row(name, f"{row['decode_tokens_per_s']:.1f}", f"{row['vs_fp32']:.2f}x")
        Console().print(others)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
