"""Structured outputs: a request's tokens constrained to a JSON schema, any JSON object, a regex,
one of a list of choices or a Lark grammar (vLLM's ``GuidedDecodingParams``; OpenAI's
``response_format``).

The grammar engine is llguidance: it has no dependency (a Rust wheel, abi3), computes each
step's token mask in tens of microseconds with no per-grammar compile step to cache beyond an
initial matcher, reads JSON schemas, regexes, Lark and (converted) GBNF, and is what vLLM's
``guidance`` backend and llama.cpp use. xgrammar, vLLM's default, needs torch, triton and
apache-tvm-ffi beside it and compiles a grammar per schema first; on this CPU-first toolkit the
dependency-free engine wins.

Each constrained sequence holds its own matcher (a copy of one made per grammar and cached).
Before each draw the sampler sets every token the grammar forbids to -inf, in the same batch as
free sequences; after it the engine feeds the token to the matcher, and a sequence whose grammar
is complete (nothing but EOS may follow) finishes with ``stop``.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# JSON as compact as OpenAI's structured outputs: no free whitespace between tokens (a model
# that keeps emitting spaces can never run a constrained request out of tokens)
_JSON_OPTIONS = {"whitespace_flexible": False}
_INSTALL = "structured outputs need llguidance: pip install llguidance"


def _llguidance():
    try:
        import llguidance
        import llguidance.torch  # noqa: F401  (the bitmask helpers)
    except ImportError as e:
        raise ImportError(f"{_INSTALL} ({e})") from None
    return llguidance


@dataclass(frozen=True)
class GuidedDecodingParams:
    """Exactly one constraint: ``json`` (a JSON schema, dict or text), ``json_object`` (any JSON
    object), ``regex``, ``choice`` (one of these strings) or ``grammar`` (Lark, as llguidance
    reads it; GBNF, with ``::=`` rules, is converted)."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self):
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("guided choice needs a non-empty list of non-empty strings")
        given = [name for name in ("json", "regex", "choice", "grammar")
                 if getattr(self, name) is not None] + (["json_object"] if self.json_object else [])
        if len(given) != 1:
            raise ValueError("give exactly one of json, json_object, regex, choice and grammar "
                             f"(got {', '.join(given) or 'none'})")

    @classmethod
    def of(cls, value: GuidedDecodingParams | dict | None) -> GuidedDecodingParams | None:
        if value is None or isinstance(value, cls):
            return value
        return cls(**value)

    def grammar_text(self) -> str:
        """The llguidance grammar (JSON text) for this constraint; equal constraints give equal
        text, which keys the cache of compiled matchers."""
        from llguidance import LLMatcher
        from llguidance.gbnf_to_lark import any_to_lark

        if self.json is not None:
            schema = json.loads(self.json) if isinstance(self.json, str) else self.json
            return LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        if self.json_object:
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in self.choice))
        try:
            lark = any_to_lark(self.grammar)
        except Exception as e:  # its GBNF reader raises plain Exceptions (no root rule, syntax)
            raise ValueError(f"the grammar does not read as GBNF or Lark: {e}") from None
        return LLMatcher.grammar_from_lark(lark)


class GrammarCompiler:
    """Matchers for one engine's tokenizer: the llguidance tokenizer is built on first use
    (about a second for a 50k vocabulary) and one matcher per grammar is kept, each request
    taking copies. Raises ValueError, with llguidance's message, for a grammar that does not
    compile (before the request is queued)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int]):
        self.tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, eos_token_ids
        self._lltokenizer = None
        self._matchers: dict[str, object] = {}
        self._lock = threading.Lock()

    def _ll_tokenizer(self):
        if self._lltokenizer is None:
            _llguidance()
            from llguidance.hf import from_tokenizer

            hf = getattr(self.tokenizer, "hf", self.tokenizer)
            self._lltokenizer = from_tokenizer(hf, n_vocab=self.vocab_size,
                                               eos_token=list(self.eos_token_ids) or None)
        return self._lltokenizer

    def matcher(self, guided: GuidedDecodingParams):
        """A fresh matcher for ``guided``, in its initial state."""
        if self.tokenizer is None:
            raise ValueError("structured outputs need the engine's tokenizer")
        llguidance = _llguidance()
        try:
            text = guided.grammar_text()
        except (ValueError, json.JSONDecodeError) as e:
            raise ValueError(f"invalid structured-output constraint: {e}") from None
        with self._lock:
            if text not in self._matchers:
                tokenizer = self._ll_tokenizer()
                is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, tokenizer)
                if is_error:
                    raise ValueError(f"invalid structured-output constraint: {messages[0]}")
                self._matchers[text] = llguidance.LLMatcher(tokenizer, text, log_level=0)
            return self._matchers[text].deep_copy()


def mask_disallowed(logits: torch.Tensor, rows: list[int], matchers: list) -> None:
    """Set to -inf, in ``logits`` rows ``rows``, every token the matching matcher forbids now."""
    import numpy as np
    from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

    vocab = logits.shape[1]
    bitmask = allocate_token_bitmask(len(rows), vocab)  # int32 words, bit i of word w: token 32w+i
    for i, matcher in enumerate(matchers):
        fill_next_token_bitmask(matcher, bitmask, i)
    # unpacked in C (llguidance's own torch helper expands every bit with torch ops: ~1 ms a
    # row at a 49k vocabulary, against ~0.03 ms here)
    allowed = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    index = torch.tensor(rows, device=logits.device)
    forbidden = torch.from_numpy(allowed == 0).to(logits.device)
    logits[index] = logits[index].masked_fill(forbidden, float("-inf"))
