"""Language-model data for the recipes: instruction and chat JSONL, plain-text folders.

- Instruction JSONL: one object per line, either alpaca fields (``instruction``, optional
  ``input``, ``output``, optional ``system``) or a chat ``messages`` list of
  ``{"role", "content"}``. Each conversation is rendered through the tokenizer's chat template
  (``mlx_core`` ``Tokenizer.apply_chat_template``); tokenizers without one get the alpaca text
  format. Labels are the token ids on the assistant turns and ``-100`` everywhere else, so the
  loss covers the responses only.
- Batches are ``(input_ids, attention_mask, labels)``, right-padded to the longest row;
  ``mlx_train.samplers.BucketSampler`` groups rows of similar length (less padding), ``pack``
  concatenates examples into fixed-length rows instead.
- Plain text: every ``.txt`` file under a folder, tokenized, joined with the end-of-text token
  and cut into fixed-length rows (labels = input ids), for pretraining.

The zoo ``Transformer`` shifts labels inside (``model(ids, labels=labels)``) and ignores -100;
``mlx_train.CausalLMLoss`` on its logits computes the same loss, and is what the Learner uses.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from mlx_train.data import DataLoaders

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
ALPACA_PROMPT = "### Instruction:\n{user}\n\n### Response:\n"


# -- tokenizers -----------------------------------------------------------------------------
def as_tokenizer(tokenizer):
    """An ``mlx_core`` ``Tokenizer`` from one, from an HF tokenizer, or from a model name / dir."""
    from mlx_core.tokenizer import Tokenizer, load_tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, (str, Path)):
        return load_tokenizer(tokenizer)
    if hasattr(tokenizer, "apply_chat_template") and hasattr(tokenizer, "encode"):
        return Tokenizer(tokenizer)
    raise TypeError(f"not a tokenizer: {type(tokenizer).__name__} (pass an mlx_core Tokenizer, an "
                    "HF tokenizer, or a model name or directory)")


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return 0 if pad is None else int(pad)


def eos_text(tokenizer) -> str:
    return tokenizer.hf.eos_token or ""


# -- conversations --------------------------------------------------------------------------
def to_messages(item: dict, where: str = "item") -> list[dict]:
    """A JSONL object (alpaca fields or chat ``messages``) as a list of chat messages."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
    if "messages" in item:
        messages = item["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: messages[{i}] must be {{'role': one of {list(ROLES)}, "
                                 f"'content': a string}}, got {m!r}")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where}: no assistant message: nothing to learn from")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "instruction" in item and "output" in item:
        user = str(item["instruction"])
        if item.get("input"):
            user += "\n\n" + str(item["input"])
        messages = [{"role": "system", "content": str(item["system"])}] if item.get("system") else []
        return messages + [{"role": "user", "content": user},
                           {"role": "assistant", "content": str(item["output"])}]
    raise ValueError(f"{where}: expected alpaca fields (instruction, input, output) or chat "
                     f"'messages'; found keys {sorted(item)}")


def read_jsonl_records(path: str | Path, parse, what: str = "examples") -> list:
    """``parse(item, where)`` of each line of a JSONL file; errors name the file and line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        records.append(parse(item, f"{path}:{n}"))
    if not records:
        raise ValueError(f"{path} holds no {what}")
    return records


def read_jsonl(path: str | Path) -> list[list[dict]]:
    """The conversations of a JSONL file (errors name the file and line)."""
    return read_jsonl_records(path, to_messages)


def _template(tokenizer, messages, generation_prompt: bool) -> str:
    if tokenizer.has_chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                             tokenize=False)
    # No chat template (a base model): the alpaca text format, single turn only.
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) > 2 or turns[0]["role"] != "user":
        raise ValueError("this tokenizer has no chat template, so only single-turn examples "
                         "(one user message, one assistant answer) can be rendered")
    text = (system[0] + "\n\n" if system else "") + ALPACA_PROMPT.format(user=turns[0]["content"])
    if len(turns) == 2:
        text += turns[1]["content"] + eos_text(tokenizer)
    return text


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The token ids of ``prompt_text``, encoded as ``tokenize_conversation`` encodes them."""
    return tokenizer.encode(prompt_text(tokenizer, messages),
                            add_special_tokens=not tokenizer.has_chat_template)


def prompt_text(tokenizer, messages: list[dict]) -> str:
    """The text a model continues to answer ``messages`` (everything before the last
    assistant message, plus the generation prompt)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant") \
        if any(m["role"] == "assistant" for m in messages) else len(messages)
    return _template(tokenizer, messages[:last], generation_prompt=True)


def tokenize_conversation(tokenizer, messages: list[dict], max_len: int | None = None,
                          last_turn_only: bool = False) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``: labels equal the ids on assistant turns (their end-of-turn tokens
    included), -100 elsewhere. Each assistant turn is rendered as the template's prefix up to it
    (with the generation prompt) and the text it adds, so prompts tokenize exactly as they will
    at generation time. ``max_len`` truncates from the right. ``last_turn_only``: labels on the
    last assistant turn only (earlier ones are context, as preference pairs need)."""
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _template(tokenizer, messages[:i], generation_prompt=True)
        through = _template(tokenizer, messages[: i + 1], generation_prompt=False)
        if not before.startswith(done) or not through.startswith(before):
            raise ValueError("the chat template does not render conversations as growing prefixes "
                             "(e.g. it rewrites earlier turns), so the loss cannot be masked to "
                             "the responses; use single-turn examples")
        first = not done and not tokenizer.has_chat_template  # templates write their own BOS
        context = tokenizer.encode(before[len(done):], add_special_tokens=first) \
            if before[len(done):] else []
        answer = tokenizer.encode(through[len(before):], add_special_tokens=False)
        ids += context + answer
        trained = answer if i == last or not last_turn_only else [IGNORE_INDEX] * len(answer)
        labels += [IGNORE_INDEX] * len(context) + trained
        done = through
    if not ids:
        raise ValueError("a conversation without an assistant message has nothing to learn from")
    if max_len is not None:
        ids, labels = ids[:max_len], labels[:max_len]
    return ids, labels


# -- datasets, batching, packing ------------------------------------------------------------
class TokenDataset(Dataset):
    """``(input_ids, labels)`` rows as long tensors; ``lengths`` for bucketing."""

    def __init__(self, rows: Sequence[tuple[list[int], list[int]]]):
        self.rows = [(torch.tensor(i, dtype=torch.long), torch.tensor(y, dtype=torch.long))
                     for i, y in rows]
        self.lengths = [len(i) for i, _ in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.rows[i]


class PadCollate:
    """Right-pad ``(ids, labels)`` rows to the longest: ``(input_ids, attention_mask, labels)``."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1):
        self.pad_id, self.multiple = pad_id, max(1, pad_to_multiple_of)

    def __call__(self, rows):
        longest = max(len(ids) for ids, _ in rows)
        longest = math.ceil(longest / self.multiple) * self.multiple
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        for r, (x, y) in enumerate(rows):
            ids[r, : len(x)], mask[r, : len(x)], labels[r, : len(y)] = x, 1, y
        return ids, mask, labels


def pack(rows: Sequence[tuple[list[int], list[int]]], max_len: int,
         pad_id: int) -> list[tuple[list[int], list[int]]]:
    """Concatenate examples into rows of exactly ``max_len`` tokens (the last row padded, labels
    -100 on padding). Examples keep their label masks; attention crosses example boundaries
    within a row (each example starts after the previous one's end-of-turn token)."""
    flat_ids: list[int] = []
    flat_labels: list[int] = []
    for ids, labels in rows:
        flat_ids += ids
        flat_labels += labels
    packed = []
    for start in range(0, len(flat_ids), max_len):
        ids, labels = flat_ids[start:start + max_len], flat_labels[start:start + max_len]
        short = max_len - len(ids)
        packed.append((ids + [pad_id] * short, labels + [IGNORE_INDEX] * short))
    return packed


def make_loaders(train_rows, valid_rows, pad_id: int, bs: int, seed: int = 0,
                 bucket: bool = True) -> DataLoaders:
    """``DataLoaders`` over tokenized rows, batches ``(input_ids, attention_mask, labels)``."""
    return dataset_loaders(TokenDataset(train_rows), TokenDataset(valid_rows), PadCollate(pad_id),
                           bs, seed, bucket, n_inp=2)


def dataset_loaders(train, valid, collate, bs: int, seed: int, bucket: bool,
                    n_inp: int) -> DataLoaders:
    """Training and validation loaders over datasets with ``lengths``: length-bucketed batches
    (``BucketSampler``) or plain shuffled ones, seeded; ``n_inp`` of each batch are inputs."""
    from mlx_train.samplers import BucketSampler

    if bs < 1:
        raise ValueError(f"bs must be at least 1, got {bs}")
    if bucket:
        train_dl = DataLoader(train, batch_sampler=BucketSampler(train.lengths, bs, seed=seed),
                              collate_fn=collate)
        valid_dl = DataLoader(valid, batch_sampler=BucketSampler(valid.lengths, bs, shuffle=False),
                              collate_fn=collate)
    else:
        train_dl = DataLoader(train, batch_size=bs, shuffle=True, collate_fn=collate,
                              generator=torch.Generator().manual_seed(seed))
        valid_dl = DataLoader(valid, batch_size=bs, shuffle=False, collate_fn=collate)
    return DataLoaders(train_dl, valid_dl, n_inp=n_inp)


# -- what the recipes consume ---------------------------------------------------------------
@dataclass
class EvalExample:
    """A held-out conversation: the model answers ``messages`` (up to the last assistant
    message) and is scored against ``answer``."""

    messages: list[dict]
    answer: str


@dataclass
class LMData:
    """Loaders for the Learner, the tokenizer they were made with, and held-out examples with
    reference answers (empty for plain text)."""

    dls: DataLoaders
    tokenizer: object
    eval_examples: list[EvalExample] = field(default_factory=list)
    info: dict = field(default_factory=dict)


def split_items(items: list, valid_pct: float, seed: int) -> tuple[list, list]:
    if not 0 < valid_pct < 1:
        raise ValueError(f"valid_pct must be in (0, 1), got {valid_pct}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    cut = max(1, int(round(valid_pct * len(items))))
    if cut >= len(items):
        raise ValueError(f"{len(items)} examples are too few to split off a validation set")
    return [items[i] for i in order[cut:]], [items[i] for i in order[:cut]]


def conversations_data(tokenizer, train: list[list[dict]], valid: list[list[dict]], *,
                       max_len: int = 512, bs: int = 8, packing: bool = False,
                       bucket: bool = True, seed: int = 0) -> LMData:
    """``LMData`` from conversations already split into training and validation sets."""
    tokenizer = as_tokenizer(tokenizer)
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    pad = pad_id_of(tokenizer)
    train_rows = [tokenize_conversation(tokenizer, m, max_len) for m in train]
    valid_rows = [tokenize_conversation(tokenizer, m, max_len) for m in valid]
    if packing:
        train_rows = pack(train_rows, max_len, pad)
    examples = [EvalExample(m, m[max(i for i, x in enumerate(m) if x["role"] == "assistant")]["content"])
                for m in valid]
    info = {"train_examples": len(train), "valid_examples": len(valid),
            "train_tokens": sum(len(i) for i, _ in train_rows),
            "response_tokens": sum(sum(t != IGNORE_INDEX for t in y) for _, y in train_rows)}
    return LMData(make_loaders(train_rows, valid_rows, pad, bs, seed, bucket and not packing),
                  tokenizer, examples, info)


def _files(files) -> list[Path]:
    if files is None:
        return []
    if isinstance(files, (str, Path)):
        files = [files]
    return [Path(f).expanduser() for f in files]


def instruction_data(tokenizer, train_files, valid_files=None, valid_pct: float = 0.1,
                     max_len: int = 512, bs: int = 8, packing: bool = False, bucket: bool = True,
                     seed: int = 0, max_examples: int | None = None) -> LMData:
    """Instruction / chat JSONL files (see the module docstring). Without ``valid_files``,
    ``valid_pct`` of the training examples are held out (seeded)."""
    train = [c for f in _files(train_files) for c in read_jsonl(f)]
    if not train:
        raise ValueError("data.train_files names no files")
    if max_examples:
        train = train[:max_examples]
    if valid_files:
        valid = [c for f in _files(valid_files) for c in read_jsonl(f)]
    else:
        train, valid = split_items(train, valid_pct, seed)
    return conversations_data(tokenizer, train, valid, max_len=max_len, bs=bs, packing=packing,
                              bucket=bucket, seed=seed)


def text_files(path: str | Path) -> list[Path]:
    root = Path(path).expanduser()
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"no such text folder: {root}")
    files = sorted(p for p in root.rglob("*.txt") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no .txt files under {root}")
    return files


def train_bpe_tokenizer(files: Sequence[Path], vocab_size: int):
    """A byte-level BPE tokenizer (``<|endoftext|>`` as its end-of-text and padding token)
    trained on ``files``; deterministic for the same files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mlx_core.tokenizer import Tokenizer as MlxTokenizer

    special = "<|endoftext|>"
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"a byte-level tokenizer needs vocab_size >= {len(alphabet) + 1}, got "
                         f"{vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[special],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train([str(f) for f in files], trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=special, pad_token=special,
                                 bos_token=special)
    return MlxTokenizer(hf)


def text_folder_data(tokenizer, path, seq_len: int = 256, bs: int = 8, valid_pct: float = 0.1,
                     seed: int = 0, vocab_size: int = 512) -> LMData:
    """Every ``.txt`` file under ``path``, tokenized, joined with the end-of-text token and cut
    into rows of ``seq_len`` tokens (labels = ids). ``tokenizer=None`` trains a byte-level BPE
    of ``vocab_size`` on the files first. ``valid_pct`` of the rows (seeded) are held out."""
    files = text_files(path)
    tokenizer = train_bpe_tokenizer(files, vocab_size) if tokenizer is None else as_tokenizer(tokenizer)
    eos = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else pad_id_of(tokenizer)
    stream: list[int] = []
    for f in files:
        stream += tokenizer.encode(f.read_text(), add_special_tokens=False) + [eos]
    rows = [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    if len(rows) < 2:
        raise ValueError(f"{len(stream)} tokens under {path} make fewer than 2 rows of seq_len="
                         f"{seq_len}; add text or lower data.seq_len")
    train, valid = split_items(rows, valid_pct, seed)
    dls = make_loaders([(r, r) for r in train], [(r, r) for r in valid], pad_id_of(tokenizer), bs,
                       seed, bucket=False)
    return LMData(dls, tokenizer, [], {"files": len(files), "tokens": len(stream),
                                       "train_rows": len(train), "valid_rows": len(valid)})


__all__ = ["IGNORE_INDEX", "EvalExample", "LMData", "PadCollate",
           "TokenDataset", "as_tokenizer", "conversations_data", "dataset_loaders", "instruction_data", "make_loaders",
           "pack", "prompt_ids", "prompt_text", "read_jsonl", "read_jsonl_records", "split_items", "text_folder_data", "to_messages",
           "tokenize_conversation", "train_bpe_tokenizer"]
