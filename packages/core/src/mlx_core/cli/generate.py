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


def _load(model: str):
    require_torch(f"running {model}")
    from mlx_core import load_model, load_tokenizer

    return load_model(model), load_tokenizer(model)


def _stream(model, tokenizer, prompt_ids, options) -> str:
    """Generate, writing text to stdout as it comes; return the whole reply."""
    from mlx_core import stream_generate
    from mlx_core.tokenizer import IncrementalDecoder

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
                 help="Wrap the prompt in the chat template (default: when the model has one).")):
    """Generate a continuation of PROMPT, streamed to stdout."""
    lm, tokenizer = _load(model)
    use_chat = tokenizer.has_chat_template if chat is None else chat
    ids = (tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if use_chat
           else tokenizer.encode(prompt))
    _stream(lm, tokenizer, ids, dict(max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_k=top_k, top_p=top_p, seed=seed))


@clean_errors
def chat(model: str = MODEL, system: str | None = typer.Option(None, "--system", help="A system prompt."),
         max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n"),
         temperature: float = TEMPERATURE, top_k: int = TOP_K, top_p: float = TOP_P,
         seed: int | None = SEED):
    """Chat with a model. /reset clears the conversation; /exit or Ctrl-D leaves."""
    lm, tokenizer = _load(model)
    if not tokenizer.has_chat_template:
        raise ValueError(f"{model} has no chat template; use `mlx generate --no-chat` instead")
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, seed=seed)
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
            reply = _stream(lm, tokenizer, tokenizer.apply_chat_template(messages), options)
        except KeyboardInterrupt:  # Ctrl-C stops this reply and forgets the turn, not the chat
            typer.echo("\n(interrupted)")
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})
