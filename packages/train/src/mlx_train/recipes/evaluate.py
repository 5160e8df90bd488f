"""Evaluation for the recipes: exact-match accuracy of greedy generations, sample generations."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def generation_model(model: nn.Module) -> nn.Module:
    """The zoo model inside a ``PeftModel`` (its adapter layers stay in place), or ``model``."""
    base = getattr(getattr(model, "base_model", None), "model", None)
    return base if base is not None and hasattr(base, "new_cache") else model


def normalize_answer(text: str) -> str:
    """What exact match compares: surrounding whitespace stripped, inner runs collapsed."""
    return " ".join(text.split())


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer, conversations: Sequence[list[dict]],
                     max_new_tokens: int = 32, bs: int = 16) -> list[str]:
    """Greedy answers to ``conversations`` (each answered after its last non-assistant turn),
    batched ``bs`` at a time, shortest prompts together."""
    from mlx_core import generate
    from mlx_train.lm_data import prompt_ids

    gen = generation_model(model)
    was_training = gen.training
    gen.eval()
    prompts = [prompt_ids(tokenizer, list(c)) for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    stop = list(tokenizer.eos_token_ids) or None
    try:
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            outs = generate(gen, [prompts[i] for i in idx], max_new_tokens=max_new_tokens,
                            stop_token_ids=stop)
            for i, out in zip(idx, outs, strict=True):
                answers[i] = tokenizer.decode(out, skip_special_tokens=True)
    finally:
        gen.train(was_training)
    return answers


def exact_match(model: nn.Module, tokenizer, examples, max_new_tokens: int = 32,
                bs: int = 16) -> tuple[float, list[str]]:
    """Share of ``examples`` (``EvalExample``s) whose greedy answer equals the reference after
    ``normalize_answer``; returns ``(accuracy, answers)``."""
    if not examples:
        raise ValueError("exact match needs examples with reference answers")
    answers = generate_answers(model, tokenizer, [e.messages for e in examples], max_new_tokens, bs)
    hits = sum(normalize_answer(a) == normalize_answer(e.answer)
               for a, e in zip(answers, examples, strict=True))
    return hits / len(examples), answers


__all__ = ["exact_match", "generate_answers", "generation_model", "normalize_answer"]
