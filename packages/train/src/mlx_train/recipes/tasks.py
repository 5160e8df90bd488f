"""Built-in synthetic instruction tasks: deterministic, with exact answers, nothing to download.

``secret_code``: translate words through a fixed, made-up code book (``red -> fish``,
``sun -> cat``, ...). A pretrained chat model cannot know the code, so its exact-match accuracy
starts near 0; a LoRA adapter learns the eight pairs, and applying them word by word to
combinations it never saw, in a few hundred steps. Held-out items are combinations that never
appear in training, so the score measures the learned mapping, not memorised answers.
"""

from __future__ import annotations

import itertools
import random

CODE_BOOK = {"red": "fish", "blue": "bread", "green": "snow", "gold": "book",
             "sun": "cat", "moon": "river", "star": "apple", "tree": "wind"}
SYSTEM = "Translate into the secret code."
INSTRUCTION = "Encode: {words}"


def encode(words: list[str]) -> str:
    """The reference answer: each word through ``CODE_BOOK``, joined by spaces."""
    return " ".join(CODE_BOOK[w] for w in words)


def item(words: list[str]) -> dict:
    """One alpaca-style item (``system``, ``instruction``, ``output``)."""
    return {"system": SYSTEM, "instruction": INSTRUCTION.format(words=" ".join(words)),
            "output": encode(words)}


def secret_code_items(n_train: int, n_valid: int, n_words: int = 3,
                      seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``(train, valid)`` items of ``n_words`` words each. Validation items are distinct word
    sequences that never occur in training; training items are drawn (seeded) from the rest,
    with repeats when ``n_train`` exceeds what is left."""
    combos = [list(c) for c in itertools.product(sorted(CODE_BOOK), repeat=n_words)]
    rng = random.Random(seed)
    rng.shuffle(combos)
    if n_valid >= len(combos):
        raise ValueError(f"n_valid={n_valid} leaves no training combinations (there are "
                         f"{len(combos)} of {n_words} words)")
    valid, rest = combos[:n_valid], combos[n_valid:]
    train = [rest[i % len(rest)] for i in range(n_train)]
    if n_train > len(rest):
        rng.shuffle(train)
    return [item(w) for w in train], [item(w) for w in valid]


def secret_code_data(tokenizer, n_train: int = 1024, n_valid: int = 48, n_words: int = 3,
                     bs: int = 8, max_len: int = 128, seed: int = 0):
    """``LMData`` for the secret-code task (the data component ``data=secret_code``)."""
    from mlx_train.lm_data import conversations_data, to_messages

    train, valid = secret_code_items(n_train, n_valid, n_words, seed)
    return conversations_data(tokenizer, [to_messages(i) for i in train],
                              [to_messages(i) for i in valid], max_len=max_len, bs=bs, seed=seed)


__all__ = ["CODE_BOOK", "encode", "item", "secret_code_data", "secret_code_items"]
