"""``load_tokenizer(source)``: the HF tokenizer of a model, with chat templates and streaming.

A thin wrapper over ``transformers.AutoTokenizer`` (torch-free) with the few calls generation
needs; ``.hf`` is the HF tokenizer for everything else.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlx_core.sources import resolve_model_dir


class Tokenizer:
    def __init__(self, hf_tokenizer, eos_token_ids: list[int] | None = None):
        self.hf = hf_tokenizer
        ids = [hf_tokenizer.eos_token_id] if hf_tokenizer.eos_token_id is not None else []
        self.eos_token_ids = sorted(set(ids + list(eos_token_ids or [])))

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        from transformers import AutoTokenizer

        directory = Path(directory)
        if not (directory / "tokenizer.json").is_file() and not (directory / "tokenizer_config.json").is_file():
            raise FileNotFoundError(f"no tokenizer files (tokenizer.json, tokenizer_config.json) in {directory}")
        return cls(AutoTokenizer.from_pretrained(directory), _generation_eos_ids(directory))

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self.hf.pad_token_id if self.hf.pad_token_id is not None else self.hf.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = True, tools: list[dict] | None = None):
        """Token ids (or the text, with ``tokenize=False``) of a conversation; ``tools`` (OpenAI's
        function definitions) are handed to templates that read them, as HF transformers does."""
        if not self.has_chat_template:
            raise ValueError("this tokenizer has no chat template; pass plain text prompts instead")
        extra = {"tools": tools} if tools else {}
        text = self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                           tokenize=False, **extra)
        # The template writes its own special tokens; encoding must not add a second BOS.
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save_pretrained(self, directory: str | Path) -> None:
        self.hf.save_pretrained(directory)


def _generation_eos_ids(directory: Path) -> list[int]:
    path = directory / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def load_tokenizer(source: str | Path) -> Tokenizer:
    """The tokenizer of a registered model name, an HF-format directory or a ``.gguf`` file."""
    return Tokenizer.from_dir(resolve_model_dir(source))


class IncrementalDecoder:
    """Turn a stream of token ids into a stream of text pieces.

    Decodes a short window of recent ids (as TGI and vLLM do) and emits what it adds; an
    incomplete UTF-8 character (U+FFFD while its bytes are split across tokens) is held back
    until it completes. ``push`` costs O(window), not O(text so far).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window that gives the new text its context
        self.read_offset = 0  # ids before this one have been emitted

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(before):]
