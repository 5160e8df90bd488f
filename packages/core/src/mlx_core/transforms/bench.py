"""``mlx bench quant``: quantized models against our fp32 model, in one process, as ratios.

Per scheme: single-stream decode speed (``mlx_core.generate``'s path: one new token per forward
after a prompt of ``prompt_len`` random token ids, greedy, ``new_tokens`` tokens; the rounds of
all schemes interleaved, the best round of each kept: the least disturbed by other work; with
``compile``, also by the compiled fixed-shape decode step, ``generate(compile=True)``), the
resident weight memory (parameters, buffers and the CPU kernels' own copies of the weights), and
quality: perplexity on an English text the package ships (``mlx_core/data/heldout_english.txt``,
public-domain speeches and novel openings, ~1,700 tokens), scored in chunks of 32 tokens over a
KV cache so the decode-sized kernels run, and greedy agreement with fp32 on 32 prompts cut from
that text (16 tokens each, 16 new tokens). With ``fuse`` (the default, as ``mlx generate`` and
the serving engine run) every model, fp32 included, has its projections fused
(``fuse_projections``).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch
from torch import nn

from mlx_core.transforms.quantize import QuantizedLinear

SCHEMES = ("int8", "int4", "w8a8", "w7a8", "gguf")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the tensors the model holds: parameters, buffers (shared ones once) and the
    layouts the CPU kernels made from them."""
    def key(t: torch.Tensor):  # oneDNN's packed weights are opaque: no storage to point at
        return t.data_ptr() if t.layout == torch.strided and not t.is_mkldnn else id(t)

    tensors = {key(t): t for t in [*model.parameters(), *model.buffers()]}
    for module in model.modules():
        if isinstance(module, QuantizedLinear) and module._cpu_layout.data is not None:
            tensors.update((key(t), t) for t in module._cpu_layout.data)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def decode_tokens_per_s(model: nn.Module, prompt: list[int], new_tokens: int,
                        compile: bool = False) -> float:
    """Tokens per second after the first (the prompt's forward is not counted); ``compile``:
    by the compiled decode step (compiled on the first call, before any timing starts)."""
    from mlx_core.models.generation import generate_steps

    steps = generate_steps(model, [prompt], max_new_tokens=new_tokens + 1, stop_token_ids=[],
                           compile=compile)
    next(steps)
    start = time.perf_counter()
    count = sum(1 for _ in steps)
    return count / (time.perf_counter() - start)


TEXT = Path(__file__).resolve().parents[1] / "data" / "heldout_english.txt"


@torch.inference_mode()
def perplexity(model: nn.Module, ids: list[int], chunk: int = 32) -> float:
    """exp(mean next-token loss) over ``ids``, fed ``chunk`` tokens at a time over a KV cache."""
    cache = model.new_cache(1, len(ids))
    total = 0.0
    for start in range(0, len(ids) - 1, chunk):
        piece = ids[start:start + chunk]
        targets = torch.tensor(ids[start + 1:start + chunk + 1])
        logits = model(torch.tensor([piece]), kv_cache=cache)[0, :len(targets)].float()
        total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
    return math.exp(total / (len(ids) - 1))


def greedy_prompts(ids: list[int], count: int = 32, length: int = 16) -> list[list[int]]:
    step = max(1, (len(ids) - length) // count)
    return [ids[i * step:i * step + length] for i in range(count)]


def quality(models: dict[str, nn.Module], ids: list[int], new_tokens: int = 16) -> dict:
    """Per model: perplexity on ``ids`` (and its ratio to the first model's, the fp32 one),
    the fraction of greedy tokens equal to the first model's, and the prompts fully equal."""
    from mlx_core import generate

    prompts = greedy_prompts(ids)
    out, reference = {}, None
    for name, model in models.items():
        ppl = perplexity(model, ids)
        tokens = generate(model, prompts, max_new_tokens=new_tokens, stop_token_ids=[])
        if reference is None:
            reference = (ppl, tokens)
        same = [sum(a == b for a, b in zip(t, r, strict=True))
                for t, r in zip(tokens, reference[1], strict=True)]
        out[name] = {"perplexity": round(ppl, 3), "perplexity_ratio": round(ppl / reference[0], 4),
                     "greedy_token_agreement": round(sum(same) / (len(prompts) * new_tokens), 3),
                     "greedy_prompts_identical": sum(n == new_tokens for n in same)}
    return out


def run(model: str = "smollm2-135m-instruct", *, schemes: tuple[str, ...] | None = None,
        prompt_len: int = 256, new_tokens: int = 64, rounds: int = 3, seed: int = 0,
        measure_quality: bool = True, compile: bool = False, peers: bool = True,
        fuse: bool = True) -> dict:
    import copy

    from mlx_core import load_model
    from mlx_core.sources import gguf_file
    from mlx_core.transforms import fuse_projections, parse_scheme, quantize

    if schemes is None:  # every scheme; "gguf" where the model comes from a GGUF file
        try:
            gguf_file(model)
            schemes = SCHEMES
        except ValueError:
            schemes = SCHEMES[:-1]
    for scheme in schemes:  # bad names fail before any model loads
        parse_scheme(scheme)
    from mlx_core import load_tokenizer
    from mlx_core.transforms.smoothquant import default_calibration

    fp32 = load_model(model)
    tokenizer = load_tokenizer(model)
    models = {"fp32": fp32}
    for scheme in schemes:  # "gguf": the source's GGUF tensors as shipped; w8a8: SmoothQuant'd
        calibration = default_calibration(tokenizer) if parse_scheme(scheme).name == "w8a8" else None
        models[scheme] = (load_model(model, quantization=scheme) if scheme == "gguf"
                          else quantize(copy.deepcopy(fp32), scheme, calibration=calibration))
    if fuse:  # as mlx generate and the serving engine run them (the same logits)
        for m in models.values():
            fuse_projections(m)
    rng = random.Random(seed)
    low = min(100, fp32.config.vocab_size // 2)
    prompt = [rng.randrange(low, fp32.config.vocab_size) for _ in range(prompt_len)]
    ways = (False, True) if compile else (False,)
    for m in models.values():  # first-call costs (allocator, CPU layouts, compiling) out of the timings
        for way in ways:
            decode_tokens_per_s(m, prompt, 2, compile=way)
    best = {(name, way): 0.0 for name in models for way in ways}
    for _ in range(rounds):
        for name, m in models.items():
            for way in ways:
                best[name, way] = max(best[name, way],
                                      decode_tokens_per_s(m, prompt, new_tokens, compile=way))
    memory = {name: weight_bytes(m) for name, m in models.items()}
    others = {}
    if peers:  # after ours, their rounds not interleaved with ours
        from mlx_core.transforms import peers as peer_engines

        others = peer_engines.run(model, prompt, new_tokens, rounds, torch.get_num_threads())
        for row in others.values():
            if "decode_tokens_per_s" in row:
                row["vs_fp32"] = round(row["decode_tokens_per_s"] / best["fp32", False], 3)
    scores = {}
    if measure_quality:
        text_ids = tokenizer.encode(TEXT.read_text())
        scores = quality(models, text_ids)
    from mlx_kernels.quantized_linear import cpu_kernels

    return {
        "model": model, "threads": torch.get_num_threads(), "cpu": cpu_kernels(),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens, "rounds": rounds,
        "schemes": {name: {"decode_tokens_per_s": round(best[name, False], 2),
                           "decode_ratio": round(best[name, False] / best["fp32", False], 3),
                           **({"compiled_decode_tokens_per_s": round(best[name, True], 2),
                               # against eager fp32 (generate's default) and compiled fp32
                               "compiled_decode_ratio": round(best[name, True] / best["fp32", False], 3),
                               "compiled_vs_compiled_fp32": round(best[name, True] / best["fp32", True], 3)}
                              if compile else {}),
                           "weight_mib": round(memory[name] / 2**20, 1),
                           "weight_ratio": round(memory[name] / memory["fp32"], 3),
                           **scores.get(name, {})}
                    for name in models},
        "peers": others,
    }
