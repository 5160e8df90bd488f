"""Speculative decoding with n-gram drafts (vLLM's ``"ngram"`` method, prompt lookup decoding).

A decoding sequence whose last tokens (an n-gram, longest first within ``prompt_lookup_min`` to
``prompt_lookup_max``) occurred earlier in its prompt or output proposes the tokens that followed
that earlier occurrence. The step computes the sequence's last token and the drafts in one
forward (a short chunk over its cached keys/values), and the sampler keeps the drafts the model
itself would have produced (greedy: equal to the argmax; sampled: the rejection rule, which keeps
each token's distribution exactly the model's), plus one token of its own. Drafts cost no model
of their own; they pay off where text repeats (code edits, quoting the prompt, a model in a
loop) and cost a little more compute per step where it does not.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

from mlx_serve.sequence import Sequence


@dataclass
class SpeculativeConfig:
    """vLLM's ``speculative_config`` fields for the n-gram method. As there, a lookup bound left
    unset takes the other's value, and both default to 5."""

    method: str = "ngram"
    num_speculative_tokens: int = 3
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None

    def __post_init__(self):
        if self.method != "ngram":
            raise ValueError(f"speculative method {self.method!r} is not supported; the one "
                             "method is 'ngram' (drafts looked up in the sequence's own tokens)")
        if self.prompt_lookup_max is None and self.prompt_lookup_min is None:
            self.prompt_lookup_max = self.prompt_lookup_min = 5
        elif self.prompt_lookup_max is None:
            self.prompt_lookup_max = self.prompt_lookup_min
        elif self.prompt_lookup_min is None:
            self.prompt_lookup_min = self.prompt_lookup_max
        if self.num_speculative_tokens < 1:
            raise ValueError("num_speculative_tokens must be >= 1 (got "
                             f"{self.num_speculative_tokens})")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("speculative_config needs 1 <= prompt_lookup_min <= prompt_lookup_max "
                             f"(got {self.prompt_lookup_min}, {self.prompt_lookup_max})")

    @classmethod
    def of(cls, value: SpeculativeConfig | dict | None) -> SpeculativeConfig | None:
        """From what a user passes: a config, a dict of its fields (vLLM's form), or None."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict such as "
                             f"{{'method': 'ngram', 'num_speculative_tokens': 3}}, got {value!r}")
        known = set(cls.__dataclass_fields__)
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown speculative_config fields {sorted(unknown)}; the fields "
                             f"are {sorted(known)}")
        return cls(**value)


class NgramProposer:
    def __init__(self, config: SpeculativeConfig, max_model_len: int):
        self.config = config
        self.max_model_len = max_model_len

    def propose(self, seq: Sequence, limit: int) -> list[int]:
        """Draft tokens for ``seq`` (at most ``limit``, and never past its ``max_tokens`` or the
        context: the token the step samples itself must still fit)."""
        limit = min(limit, self.config.num_speculative_tokens,
                    self.max_model_len - seq.num_tokens - 1)
        if seq.params.max_tokens is not None:
            limit = min(limit, seq.params.max_tokens - len(seq.output_token_ids) - 1)
        if limit <= 0:
            return []
        return find_continuation(seq.all_token_ids, self.config.prompt_lookup_min,
                                 self.config.prompt_lookup_max, limit)


def find_continuation(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the longest n-gram
    (``min_n <= n <= max_n``) that ends ``tokens``; [] when none occurred."""
    # byte search over the ids as 4-byte words: C speed, where a Python scan over a few hundred
    # positions per sequence per step would cost a noticeable share of a decode step
    data = array("i", tokens).tobytes()
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        pattern = data[-4 * n:]
        end = len(data) - 4  # the occurrence must leave at least one token after it
        while True:
            at = data.rfind(pattern, 0, end)
            if at < 0:
                break
            if at % 4 == 0:
                start = at // 4 + n
                return tokens[start:start + k]
            end = at + len(pattern) - 1  # unaligned hit: look further left
    return []
