"""Simple generation with a contiguous KV cache: greedy or sampled, batched, streaming.

This is the in-process path for scripts and ``mlx generate``; the serving engine (mlx-serve)
is the throughput path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from mlx_core.models.decode_step import compiled_cache_length, compiled_decode_step
from mlx_core.models.sampling import filter_logits
from mlx_core.rope_scaling import recompute_length
from mlx_core.sampling_options import sampling_problems


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int = 0,
                top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids ``[B]`` from ``logits [B, V]``: greedy when ``temperature <= 0``,
    otherwise temperature, then top-k, then top-p (nucleus) filtering, then sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _check_options(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    problems = []
    if max_new_tokens < 1:
        problems.append(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
    problems += sampling_problems(temperature, top_p, top_k=top_k)
    if problems:
        raise ValueError("; ".join(problems))


def _stop_ids(model: nn.Module, stop_token_ids) -> set[int]:
    if stop_token_ids is None:
        stop_token_ids = model.config.eos_token_id
    if stop_token_ids is None:
        return set()
    return {stop_token_ids} if isinstance(stop_token_ids, int) else set(stop_token_ids)


@torch.inference_mode()
def generate_steps(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
                   temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                   seed: int | None = None, stop_token_ids=None,
                   compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield each step's new tokens ``[B]`` (-1 for rows that already stopped).

    Prompts are left-padded into one batch; positions count real tokens only. ``compile``:
    decode with the compiled fixed-shape step (``mlx_core.models.decode_step``; compiled on
    first use per model, batch size and cache length, rounded up to a multiple of 128).
    Phi-3 with LongRoPE computes every token again, with the long factors, at the step whose
    cache holds ``original_max_position_embeddings`` slots, as HF's Phi-3 generation does
    (``mlx_core.rope_scaling.recompute_length``).
    """
    _check_options(max_new_tokens, temperature, top_k, top_p)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.device if hasattr(model, "device") else next(model.parameters()).device
    longest = max(len(p) for p in prompts)
    total = longest + max_new_tokens
    limit = model.config.max_position_embeddings
    if model.config.position_kind == "learned" and total > limit:
        raise ValueError(f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds this "
                         f"model's {limit} learned positions")
    ids = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, longest - len(prompt):] = 1
    stops = torch.tensor(sorted(_stop_ids(model, stop_token_ids)), dtype=torch.long, device=device)
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    recompute_at = recompute_length(model.config.model_type, model.config.rope_scaling,
                                    model.config.max_position_embeddings)

    def prefill(ids, mask):
        cache = model.new_cache(len(prompts), compiled_cache_length(total) if compile else total)
        logits = model(ids, attention_mask=mask, kv_cache=cache, logits_to_keep=1)[:, -1]
        return logits, cache, _compiled_decode(model, cache) if compile else None

    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    logits, cache, decode = prefill(ids, mask)
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                            generator=generator)
        yield token.masked_fill(finished, -1)
        finished |= torch.isin(token, stops)
        if bool(finished.all()):
            return
        if recompute_at is not None:
            ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if cache.length == recompute_at:  # every token again, under the long factors
                logits, cache, decode = prefill(ids, mask)
                continue
        logits = model(token[:, None], kv_cache=cache)[:, -1] if decode is None else decode(token)


def _compiled_decode(model: nn.Module, cache):
    """``token [B] -> logits [B, V]`` by the compiled step, which then advances the cache."""
    step = compiled_decode_step(model, cache)
    positions = cache.key_valid.sum(-1)  # the next token's: real tokens so far, per row
    slot = torch.tensor([cache.length], device=positions.device)

    def decode(token: torch.Tensor) -> torch.Tensor:
        logits = step(token, positions, slot)
        cache.advance(1)
        positions.add_(1)
        slot.add_(1)
        return logits

    return decode


def stream_generate(model: nn.Module, prompt_ids: Sequence[int], **options) -> Iterator[int]:
    """Yield new token ids one at a time; the stop token, if reached, is the last one yielded.

    Options: ``max_new_tokens=128, temperature=0.0 (greedy), top_k=0, top_p=1.0, seed=None,
    stop_token_ids=None`` (None: the model's eos ids), ``compile=False`` (True: decode with the
    compiled fixed-shape step, see ``generate_steps``).
    """
    for step in generate_steps(model, [prompt_ids], **options):
        yield int(step[0])


def generate(model: nn.Module, prompts: Sequence[int] | Sequence[Sequence[int]], **options):
    """New token ids for one prompt (``list[int]`` -> ``list[int]``) or a batch of prompts.

    Options as for ``stream_generate``. Greedy decoding matches HF ``generate(do_sample=False)``.
    """
    single = len(prompts) > 0 and isinstance(prompts[0], int)
    batch = [prompts] if single else prompts
    out: list[list[int]] = [[] for _ in batch]
    for step in generate_steps(model, batch, **options):
        for row, token in enumerate(step.tolist()):
            if token >= 0:
                out[row].append(token)
    return out[0] if single else out
