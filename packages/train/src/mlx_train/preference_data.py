"""Preference data for DPO: a prompt with a chosen and a rejected response, per JSONL line.

- Each line: ``prompt`` (a string, or a chat ``messages`` list ending with a user turn),
  ``chosen`` and ``rejected`` (strings, or TRL's conversational form: a one-message list
  ``[{"role": "assistant", "content": ...}]``), and optionally ``ref_chosen_logps`` /
  ``ref_rejected_logps``: the reference model's summed log-probabilities of the two responses
  (for ``reference=data``: no reference forward pass during training).
- Both conversations (prompt + response) go through ``mlx_train.lm_data.tokenize_conversation``
  (the chat template, as instruction data), with labels on the final response only.
- Batches are ``(input_ids [2B, T], attention_mask [2B, T], labels [2B, T], ref_logps [B, 2])``:
  the B chosen rows, then the B rejected rows (one forward pass for both halves, as TRL and
  torchtune do); ``ref_logps`` columns are (chosen, rejected), NaN where the file has none. The
  last element is the Learner's target, so batch-size bookkeeping counts pairs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mlx_train.data import DataLoaders
from mlx_train.lm_data import (
    IGNORE_INDEX,
    EvalExample,
    LMData,
    PadCollate,
    _files,
    as_tokenizer,
    dataset_loaders,
    pad_id_of,
    read_jsonl_records,
    split_items,
    to_messages,
    tokenize_conversation,
)

REFERENCE_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclass
class PreferencePair:
    """A prompt (chat messages) and two responses; ``ref``: the reference model's summed
    log-probs of (chosen, rejected), or None."""

    prompt: list[dict]
    chosen: str
    rejected: str
    ref: tuple[float, float] | None = None


# -- reading --------------------------------------------------------------------------------
def _response(value, key: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str)):
        return value[0]["content"]
    raise ValueError(f"{where}: '{key}' must be a string (or [{{'role': 'assistant', 'content': "
                     f"...}}]), got {value!r:.80}")


def to_preference(item: dict, where: str = "item") -> PreferencePair:
    """A JSONL object as a ``PreferencePair`` (errors name ``where`` and the fix)."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in item]
    if missing:
        raise ValueError(f"{where}: a preference pair needs 'prompt', 'chosen' and 'rejected'; "
                         f"missing {missing} (found keys {sorted(item)})")
    prompt = item["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    elif not isinstance(prompt, list) or not prompt:
        raise ValueError(f"{where}: 'prompt' must be a string or a non-empty list of chat messages")
    chosen = _response(item["chosen"], "chosen", where)
    rejected = _response(item["rejected"], "rejected", where)
    if prompt[-1].get("role") == "assistant":
        raise ValueError(f"{where}: the prompt ends with an assistant message; the responses go "
                         "in 'chosen' and 'rejected'")
    # lm_data's checks of roles and contents, on the whole conversation
    prompt = to_messages({"messages": [*prompt, {"role": "assistant", "content": chosen}]},
                         where)[:-1]
    ref = None
    present = [k for k in REFERENCE_FIELDS if item.get(k) is not None]
    if present:
        if len(present) == 1:
            raise ValueError(f"{where}: has {present[0]} but not the other of {list(REFERENCE_FIELDS)}")
        values = [item[k] for k in REFERENCE_FIELDS]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   for v in values):
            raise ValueError(f"{where}: {list(REFERENCE_FIELDS)} must be finite numbers (summed "
                             f"log-probs of each response), got {values}")
        ref = (float(values[0]), float(values[1]))
    return PreferencePair(prompt, chosen, rejected, ref)


def read_preferences(path: str | Path) -> list[PreferencePair]:
    """The preference pairs of a JSONL file (errors name the file and line)."""
    return read_jsonl_records(path, to_preference, "preference pairs")


# -- tokenizing and batching ----------------------------------------------------------------
Row = tuple[list[int], list[int]]


def tokenize_pair(tokenizer, pair: PreferencePair, max_len: int | None = None) -> tuple[Row, Row]:
    """``((chosen_ids, chosen_labels), (rejected_ids, rejected_labels))``: each the prompt and
    one response through the chat template, labels on that response only."""
    def row(response: str) -> Row:
        messages = [*pair.prompt, {"role": "assistant", "content": response}]
        return tokenize_conversation(tokenizer, messages, max_len, last_turn_only=True)

    return row(pair.chosen), row(pair.rejected)


class PairDataset(Dataset):
    """``(chosen (ids, labels), rejected (ids, labels), ref [2])`` items; ``lengths`` (the
    longer of the two rows) for bucketing."""

    def __init__(self, rows: Sequence[tuple[Row, Row]], refs: Sequence[tuple[float, float] | None]):
        def t(x):
            return torch.tensor(x, dtype=torch.long)

        self.items = [((t(c[0]), t(c[1])), (t(r[0]), t(r[1])),
                       torch.tensor(ref if ref is not None else (math.nan, math.nan)))
                      for (c, r), ref in zip(rows, refs, strict=True)]
        self.lengths = [max(len(c[0]), len(r[0])) for c, r in rows]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class PairCollate:
    """Pairs -> ``(input_ids, attention_mask, labels, ref_logps)``: ``lm_data.PadCollate`` over
    the chosen rows followed by the rejected rows, and the reference log-probs ``[B, 2]``."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1):
        self.pad = PadCollate(pad_id, pad_to_multiple_of)

    def __call__(self, items):
        ids, mask, labels = self.pad([c for c, _, _ in items] + [r for _, r, _ in items])
        return ids, mask, labels, torch.stack([ref for _, _, ref in items]).float()


def pair_loaders(train: PairDataset, valid: PairDataset, pad_id: int, bs: int, seed: int = 0,
                 bucket: bool = True) -> DataLoaders:
    return dataset_loaders(train, valid, PairCollate(pad_id), bs, seed, bucket, n_inp=3)


def _has_response(row: Row) -> bool:
    return any(y != IGNORE_INDEX for y in row[1])


def pairs_data(tokenizer, train: list[PreferencePair], valid: list[PreferencePair], *,
               max_len: int = 512, bs: int = 4, bucket: bool = True, seed: int = 0,
               require_reference_logps: bool = False) -> LMData:
    """``LMData`` over preference pairs already split into training and validation sets; its
    ``eval_examples`` are the validation prompts with the chosen responses as references."""
    tokenizer = as_tokenizer(tokenizer)
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    if require_reference_logps:
        lacking = sum(p.ref is None for p in train + valid)
        if lacking:
            raise ValueError(f"reference=data, but {lacking} of {len(train) + len(valid)} pairs have "
                             f"no {' / '.join(REFERENCE_FIELDS)}; add them to every line (summed "
                             "log-probs of each response under the reference model) or use "
                             "reference=model")
    sets, dropped = [], 0
    for pairs in (train, valid):
        rows, kept = [], []
        for pair in pairs:
            chosen, rejected = tokenize_pair(tokenizer, pair, max_len)
            # a response cut away entirely by max_len has no log-prob to compare
            if _has_response(chosen) and _has_response(rejected):
                rows.append((chosen, rejected))
                kept.append(pair)
            else:
                dropped += 1
        if not rows:
            raise ValueError(f"every pair's response lies beyond data.max_len={max_len} tokens; "
                             "raise data.max_len")
        sets.append((PairDataset(rows, [p.ref for p in kept]), kept))
    (train_ds, train_pairs), (valid_ds, valid_pairs) = sets
    examples = [EvalExample([*p.prompt, {"role": "assistant", "content": p.chosen}], p.chosen)
                for p in valid_pairs]
    info = {"train_pairs": len(train_ds), "valid_pairs": len(valid_ds),
            "dropped_pairs": dropped,
            "reference_logps": all(p.ref is not None for p in train_pairs + valid_pairs)}
    return LMData(pair_loaders(train_ds, valid_ds, pad_id_of(tokenizer), bs, seed, bucket),
                  tokenizer, examples, info)


def preference_data(tokenizer, train_files, valid_files=None, valid_pct: float = 0.1,
                    max_len: int = 512, bs: int = 4, bucket: bool = True, seed: int = 0,
                    max_examples: int | None = None,
                    require_reference_logps: bool = False) -> LMData:
    """Preference JSONL files (see the module docstring). Without ``valid_files``,
    ``valid_pct`` of the training pairs are held out (seeded). ``bs`` counts pairs (each batch
    holds 2 * bs sequences). ``require_reference_logps``: every pair must carry
    ``ref_chosen_logps`` / ``ref_rejected_logps`` (the dpo recipe sets it for ``reference=data``)."""
    train = [p for f in _files(train_files) for p in read_preferences(f)]
    if not train:
        raise ValueError("data.train_files names no files")
    if max_examples:
        train = train[:max_examples]
    if valid_files:
        valid = [p for f in _files(valid_files) for p in read_preferences(f)]
    else:
        train, valid = split_items(train, valid_pct, seed)
    return pairs_data(tokenizer, train, valid, max_len=max_len, bs=bs, bucket=bucket, seed=seed,
                      require_reference_logps=require_reference_logps)


# -- the built-in synthetic preference task -------------------------------------------------
def secret_code_pairs(n_train: int, n_valid: int, n_words: int = 3,
                      seed: int = 0) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """``mlx_train.recipes.tasks``' secret-code items as preference pairs: chosen = the right
    code, rejected = the same code with one word swapped for another code word (a near miss,
    so the preference is about the mapping, not the format)."""
    from mlx_train.recipes.tasks import CODE_BOOK, secret_code_items

    rng = random.Random(seed)
    codes = sorted(CODE_BOOK.values())

    def pair(item: dict) -> PreferencePair:
        prompt = to_messages(item)[:-1]
        words = item["output"].split()
        i = rng.randrange(len(words))
        words[i] = rng.choice([c for c in codes if c != words[i]])
        return PreferencePair(prompt, item["output"], " ".join(words))

    train, valid = secret_code_items(n_train, n_valid, n_words, seed)
    return [pair(i) for i in train], [pair(i) for i in valid]


def secret_code_preference_data(tokenizer, n_train: int = 256, n_valid: int = 48,
                                n_words: int = 3, bs: int = 4, max_len: int = 128,
                                seed: int = 0) -> LMData:
    """``LMData`` of secret-code preference pairs (the data component ``data=secret_code_prefs``)."""
    train, valid = secret_code_pairs(n_train, n_valid, n_words, seed)
    return pairs_data(tokenizer, train, valid, max_len=max_len, bs=bs, seed=seed)


__all__ = ["REFERENCE_FIELDS", "PairCollate", "PairDataset", "PreferencePair", "pair_loaders",
           "pairs_data", "preference_data", "read_preferences", "secret_code_pairs",
           "secret_code_preference_data", "to_preference", "tokenize_pair"]
