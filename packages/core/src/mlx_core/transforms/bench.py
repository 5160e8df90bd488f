"""``mlx bench quant``: quantized models against our fp32 model, in one process, as ratios.

Per scheme: single-stream decode speed (``mlx_core.generate``'s path: one new token per forward
after a prompt of ``prompt_len`` random token ids, greedy, ``new_tokens`` tokens; the rounds of
all schemes interleaved, the best round of each kept: the least disturbed by other work) and the
resident weight memory (parameters, buffers and the CPU kernels' own copies of the weights).
"""

from __future__ import annotations

import random
import time

import torch
from torch import nn

from mlx_core.transforms.quantize import QuantizedLinear

SCHEMES = ("int8", "int4", "w8a8", "gguf")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the tensors the model holds: parameters, buffers (shared ones once) and the
    layouts the CPU kernels made from them."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    for module in model.modules():
        if isinstance(module, QuantizedLinear) and module._cpu_layout.data is not None:
            tensors.update((t.data_ptr(), t) for t in module._cpu_layout.data)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def decode_tokens_per_s(model: nn.Module, prompt: list[int], new_tokens: int) -> float:
    """Tokens per second after the first (the prompt's forward is not counted)."""
    from mlx_core.models.generation import generate_steps

    steps = generate_steps(model, [prompt], max_new_tokens=new_tokens + 1, stop_token_ids=[])
    next(steps)
    start = time.perf_counter()
    count = sum(1 for _ in steps)
    return count / (time.perf_counter() - start)


def run(model: str = "smollm2-135m-instruct", *, schemes: tuple[str, ...] | None = None,
        prompt_len: int = 256, new_tokens: int = 64, rounds: int = 3, seed: int = 0) -> dict:
    import copy

    from mlx_core import load_model
    from mlx_core.sources import gguf_file
    from mlx_core.transforms import parse_scheme, quantize

    if schemes is None:  # every scheme; "gguf" where the model comes from a GGUF file
        try:
            gguf_file(model)
            schemes = SCHEMES
        except ValueError:
            schemes = SCHEMES[:-1]
    for scheme in schemes:  # bad names fail before any model loads
        parse_scheme(scheme)
    fp32 = load_model(model)
    models = {"fp32": fp32}
    for scheme in schemes:  # "gguf": the source's GGUF tensors as shipped
        models[scheme] = (load_model(model, quantization=scheme) if scheme == "gguf"
                          else quantize(copy.deepcopy(fp32), scheme))
    rng = random.Random(seed)
    low = min(100, fp32.config.vocab_size // 2)
    prompt = [rng.randrange(low, fp32.config.vocab_size) for _ in range(prompt_len)]
    for m in models.values():  # first-call costs (allocator, CPU layouts) out of the timings
        decode_tokens_per_s(m, prompt[:8], 2)
    best = dict.fromkeys(models, 0.0)
    for _ in range(rounds):
        for name, m in models.items():
            best[name] = max(best[name], decode_tokens_per_s(m, prompt, new_tokens))
    memory = {name: weight_bytes(m) for name, m in models.items()}
    return {
        "model": model, "threads": torch.get_num_threads(), "prompt_len": prompt_len,
        "new_tokens": new_tokens, "rounds": rounds,
        "schemes": {name: {"decode_tokens_per_s": round(best[name], 2),
                           "decode_ratio": round(best[name] / best["fp32"], 3),
                           "weight_mib": round(memory[name] / 2**20, 1),
                           "weight_ratio": round(memory[name] / memory["fp32"], 3)}
                    for name in models},
    }
