"""``SamplingParams``: how one request is decoded, with vLLM's names and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlx_core.sampling_options import sampling_problems
from mlx_serve.structured import GuidedDecodingParams


@dataclass
class SamplingParams:
    """Per-request decoding options (vLLM's fields; OpenAI's penalties).

    ``temperature=0`` is greedy. ``top_k <= 0``, ``top_p=1`` and ``min_p=0`` disable those filters.
    ``repetition_penalty`` (HF/CTRL style) applies to prompt and output tokens;
    ``frequency_penalty`` / ``presence_penalty`` (OpenAI style) to output tokens only.
    ``seed`` makes this request's samples reproducible whatever else shares its batch.
    ``logprobs=k`` returns the chosen token's log-probability and the ``k`` most likely ones (of
    the model's raw distribution, before penalties, temperature and filters).
    ``prompt_logprobs=k`` returns each prompt token's log-probability (and the ``k`` most likely
    at its position) in ``RequestOutput.prompt_logprobs``, from position
    ``prompt_logprobs_start`` on (earlier positions are None, and may come from the prefix
    cache: scoring several continuations of one context computes the context once).
    ``stop`` strings end the text (excluded unless ``include_stop_str_in_output``);
    ``stop_token_ids`` end it after that token; EOS ends it unless ``ignore_eos``.
    ``guided_decoding`` constrains the output to a JSON schema, a regex, a list of choices or a
    grammar (``mlx_serve.structured.GuidedDecodingParams``, or a dict of its fields).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    prompt_logprobs_start: int = 1  # position 0 has no log-probability: nothing precedes it
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    guided_decoding: GuidedDecodingParams | dict | None = None
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self):
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        problems = []
        try:
            self.guided_decoding = GuidedDecodingParams.of(self.guided_decoding)
        except (TypeError, ValueError) as e:
            problems.append(f"guided_decoding: {e}")
        if self.n < 1:
            problems.append(f"n must be >= 1 (got {self.n})")
        problems += sampling_problems(self.temperature, self.top_p, self.min_p)
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0 (got {self.repetition_penalty}); "
                            "1 disables it")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                problems.append(f"{name} must be in [-2, 2] (got {getattr(self, name)})")
        if self.max_tokens is not None and self.max_tokens < 1:
            problems.append(f"max_tokens must be >= 1 (got {self.max_tokens})")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            problems.append(f"min_tokens must be in [0, max_tokens] (got {self.min_tokens})")
        if self.logprobs is not None and self.logprobs < 0:
            problems.append(f"logprobs must be >= 0 (got {self.logprobs})")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            problems.append(f"prompt_logprobs must be >= 0 (got {self.prompt_logprobs})")
        if self.prompt_logprobs_start < 1:
            problems.append(f"prompt_logprobs_start must be >= 1 (got "
                            f"{self.prompt_logprobs_start}): the first token has no "
                            "log-probability")
        if any(not s for s in self.stop_strings):
            problems.append("stop strings must not be empty")
        if problems:
            raise ValueError("invalid sampling parameters: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def needs_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0)
