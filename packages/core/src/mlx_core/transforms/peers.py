"""Other engines' single-stream decode on the same model, for ``mlx bench quant``'s same-run
comparison: CTranslate2 (the HF weights converted, run in float32 and int8) and llama.cpp
through llama-cpp-python (the model's GGUF file as it ships). Both are optional: a peer that is
not installed is reported as skipped, with the command that installs it.

Each is timed as ``mlx_core.generate`` is in ``bench``: greedy, after the same prompt token ids,
the tokens after the first counted, the best of ``rounds``. Each runs in a process of its own
(``python -m mlx_core.transforms.peers ENGINE ARGS_JSON``): a peer's native code that crashes
(a llama.cpp build that segfaults on this machine's CPU, say) is reported as failed, with the
bench's own figures intact.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

INSTALL = {
    "ctranslate2": "pip install ctranslate2",
    "llama_cpp": "pip install llama-cpp-python  (builds llama.cpp from source: minutes)",
}


def _rate(tokens: Iterator, new_tokens: int) -> float:
    """Tokens per second after the first of ``tokens`` (a generator), over ``new_tokens``."""
    next(tokens)
    start, count = time.perf_counter(), 0
    for _ in tokens:
        count += 1
        if count == new_tokens:
            break
    return count / (time.perf_counter() - start)


def ctranslate2_decode(model_dir: Path, prompt: list[int], new_tokens: int, rounds: int,
                       threads: int) -> dict[str, float]:
    """``{"ctranslate2 float32": tok/s, "ctranslate2 int8": tok/s}`` for an HF model directory."""
    import ctranslate2
    from ctranslate2.converters import TransformersConverter
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(model_dir).convert_ids_to_tokens(prompt)
    out = {}
    with tempfile.TemporaryDirectory() as converted:
        TransformersConverter(str(model_dir)).convert(converted, force=True)
        for compute in ("float32", "int8"):
            generator = ctranslate2.Generator(converted, device="cpu", compute_type=compute,
                                              intra_threads=threads)
            out[f"ctranslate2 {compute}"] = max(
                _rate(generator.generate_tokens(tokens, max_length=new_tokens + 1,
                                                min_length=new_tokens + 1, sampling_topk=1),
                      new_tokens)
                for _ in range(rounds))
    return out


def llama_cpp_decode(gguf_path: Path, prompt: list[int], new_tokens: int, rounds: int,
                     threads: int) -> dict[str, float]:
    """``{"llama.cpp gguf": tok/s}`` for the GGUF file as it ships."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_threads=threads, n_ctx=len(prompt) + new_tokens + 8,
                verbose=False)
    return {"llama.cpp gguf": max(
        _rate(llm.generate(prompt, top_k=1, temp=0.0, reset=True), new_tokens)
        for _ in range(rounds))}


ENGINES = {"ctranslate2": ctranslate2_decode, "llama_cpp": llama_cpp_decode}


def _in_own_process(engine: str, source: Path, *args) -> dict[str, dict]:
    """``ENGINES[engine](source, *args)`` in a child process: its rates, or a failure named."""
    done = subprocess.run([sys.executable, "-m", "mlx_core.transforms.peers", engine,
                           json.dumps([str(source), *args])], capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return {engine: {"failed": f"exit status {done.returncode}: {last}"}}
    rates = json.loads(done.stdout.strip().splitlines()[-1])
    return {name: {"decode_tokens_per_s": round(r, 2)} for name, r in rates.items()}


def run(model: str, prompt: list[int], new_tokens: int, rounds: int, threads: int) -> dict:
    """Per peer: ``{"decode_tokens_per_s": ...}``, ``{"skipped": why}`` or ``{"failed": how}``."""
    from mlx_core.sources import gguf_file, resolve_model_dir

    out: dict[str, dict] = {}
    args = (prompt, new_tokens, rounds, threads)
    if importlib.util.find_spec("ctranslate2") is None:
        out["ctranslate2"] = {"skipped": f"not installed: {INSTALL['ctranslate2']}"}
    else:
        out.update(_in_own_process("ctranslate2", resolve_model_dir(model), *args))
    try:
        gguf = gguf_file(model)
    except ValueError:
        gguf = None
    if gguf is None:
        out["llama.cpp"] = {"skipped": f"{model} has no GGUF file to run"}
    elif importlib.util.find_spec("llama_cpp") is None:
        out["llama.cpp"] = {"skipped": f"not installed: {INSTALL['llama_cpp']}"}
    else:
        out.update(_in_own_process("llama_cpp", gguf, *args))
    return out


if __name__ == "__main__":  # ENGINE ARGS_JSON: one peer's rates as one JSON line
    source, *rest = json.loads(sys.argv[2])
    print(json.dumps(ENGINES[sys.argv[1]](Path(source), *rest)))
