"""``mlx bench jax``: mlx-jax (jit-compiled) against the torch zoo (eager) on the same weights and
inputs: a full forward over ``[batch, seq]`` tokens, and greedy generation of ``new_tokens``
tokens after a ``seq``-token prompt (prefill included). Reports tokens/s of each side and their
ratios (JAX / torch: above 1, JAX is faster); compile time is measured apart and left out of
the steady-state numbers. Also checks that both sides generate the same tokens.

Needs torch (the baseline side); imported only when the benchmark runs.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

QUICK = dict(batch=2, seq=32, new_tokens=16)  # with a tiny random llama


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _tiny_model_dir(root: Path) -> Path:
    import torch

    from mlx_core import build_model, get_preset, save_model

    torch.manual_seed(0)
    return save_model(build_model(get_preset("tiny-llama")), root / "tiny-llama")


def run(model: str = "smollm2-135m-instruct", *, quick: bool = False, batch: int = 1,
        seq: int = 128, new_tokens: int = 32, repeats: int = 5) -> dict:
    """Time both sides; returns the timings, tokens/s and ratios as a dict."""
    from mlx_core import require_torch

    torch = require_torch("mlx bench jax (the torch zoo is the baseline)")
    import jax
    from flax import nnx

    import mlx_core
    import mlx_jax
    from mlx_jax.generation import generate_tokens

    if quick:
        batch, seq, new_tokens = (QUICK[k] for k in ("batch", "seq", "new_tokens"))
    if min(batch, seq, new_tokens, repeats) < 1:
        raise ValueError("batch, seq, new_tokens and repeats must all be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        source = _tiny_model_dir(Path(tmp)) if quick else model
        torch_model = mlx_core.load_model(source).eval()
        jax_model = mlx_jax.load_model(source)
    config = jax_model.config
    ids = np.random.RandomState(0).randint(0, config.vocab_size, (batch, seq))
    prompts = ids.tolist()

    # Torch first, then JAX: XLA's CPU threads keep spinning for a while after a call and
    # would slow torch's threads down if the two were interleaved.
    torch_ids = torch.tensor(ids)

    def torch_forward():
        with torch.no_grad():
            torch_model(torch_ids)

    def torch_generate():
        return mlx_core.generate(torch_model, prompts, max_new_tokens=new_tokens, stop_token_ids=[])

    torch_forward()  # warm-up
    torch_fwd = _median_seconds(torch_forward, repeats)
    torch_tokens = torch_generate()
    torch_gen = _median_seconds(torch_generate, repeats)

    # jax.jit over the split state, as generation runs (nnx.jit would re-walk the module graph
    # in Python on every call); compile time is measured apart
    graphdef, state = nnx.split(jax_model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    jax_ids = jax.numpy.asarray(ids)
    start = time.perf_counter()
    jax.block_until_ready(forward(state, jax_ids))
    forward_compile = time.perf_counter() - start
    jax_fwd = _median_seconds(lambda: jax.block_until_ready(forward(state, jax_ids)), repeats)

    def jax_generate():
        return generate_tokens(jax_model, prompts, max_new_tokens=new_tokens, stop_token_ids=[])

    start = time.perf_counter()
    jax_tokens = jax_generate()
    generate_compile = time.perf_counter() - start
    jax_gen = _median_seconds(jax_generate, repeats)

    forward_tokens, generated = batch * seq, batch * new_tokens
    result = {
        "model": "tiny-llama (random)" if quick else model,
        "device": str(jax.devices()[0].platform), "torch_threads": torch.get_num_threads(),
        "batch": batch, "seq": seq, "new_tokens": new_tokens, "repeats": repeats,
        "forward": {"torch_s": torch_fwd, "jax_s": jax_fwd, "jax_compile_s": forward_compile,
                    "torch_tokens_per_s": forward_tokens / torch_fwd,
                    "jax_tokens_per_s": forward_tokens / jax_fwd},
        "generate": {"torch_s": torch_gen, "jax_s": jax_gen, "jax_compile_s": generate_compile,
                     "torch_tokens_per_s": generated / torch_gen,
                     "jax_tokens_per_s": generated / jax_gen},
        "same_tokens": [list(map(int, row)) for row in jax_tokens] == torch_tokens,
    }
    for part in ("forward", "generate"):
        side = result[part]
        side["ratio"] = side["jax_tokens_per_s"] / side["torch_tokens_per_s"]
    return result


def report(result: dict) -> str:
    """The result as the lines ``mlx bench jax`` prints."""
    lines = [f"mlx bench jax: {result['model']} on {result['device']} (torch threads: "
             f"{result['torch_threads']}), batch {result['batch']}, seq {result['seq']}, "
             f"{result['new_tokens']} new tokens, median of {result['repeats']}"]
    for part, what in (("forward", "forward"), ("generate", "greedy generation")):
        side = result[part]
        lines.append(f"{what}: torch {side['torch_tokens_per_s']:.1f} tok/s, jax "
                     f"{side['jax_tokens_per_s']:.1f} tok/s (compile {side['jax_compile_s']:.2f} s), "
                     f"ratio jax/torch {side['ratio']:.3f}")
    lines.append(f"same greedy tokens: {result['same_tokens']}")
    return "\n".join(lines)


__all__ = ["QUICK", "report", "run"]
