"""One generated sequence as a state machine: waiting -> running -> finished, with preemption.

A request with ``n > 1`` owns ``n`` sequences that share its prompt (and, through prefix
caching, the prompt's KV blocks).
"""

from __future__ import annotations

import enum
import itertools
import time

from mlx_serve.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH,
             SequenceStatus.FINISHED_ABORTED}
_ALLOWED = {
    SequenceStatus.WAITING: {SequenceStatus.RUNNING, SequenceStatus.FINISHED_ABORTED},
    SequenceStatus.RUNNING: {SequenceStatus.PREEMPTED, *_FINISHED},
    SequenceStatus.PREEMPTED: {SequenceStatus.WAITING, SequenceStatus.FINISHED_ABORTED},
}


class InvalidTransition(RuntimeError):
    pass


class Sequence:
    """Token ids, KV blocks and progress of one sequence.

    ``num_computed_tokens`` counts tokens whose keys/values are in the cache (prefix-cache hits
    included); the scheduler gives the sequence ``num_tokens - num_computed_tokens`` more at most.
    """

    _ids = itertools.count()

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                 index: int = 0, priority: int = 0, lora=None,
                 arrival_time: float | None = None, seed: int | None = None):
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id
        self.index = index
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.priority = priority
        self.lora = lora  # a LoadedLora, or None for the base model
        self.lora_id = lora.lora_id if lora is not None else None  # keys the prefix cache
        self.lora_slot = lora.slot if lora is not None else -1
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = SequenceStatus.WAITING
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []  # hashes of the full blocks already registered
        self.num_computed_tokens = 0
        # speculative tokens computed with this step's last token, verified by the sampler
        self.draft_token_ids: list[int] = []
        self.guide = None  # structured outputs: the grammar's matcher (mlx_serve.structured)
        # RoPE whose table depends on the length (dynamic NTK, LongRoPE; set by the engine):
        # the length the table of every computed token counts from (the prompt's; after
        # Phi-3's switch, the length the sequence was computed again at), what tells that
        # table apart in the prefix cache, and the position at which every token is computed
        # again (Phi-3's LongRoPE; None: none ahead)
        self.rope_length = len(self.prompt_token_ids)
        self.rope_key = None
        self.rope_switch: int | None = None
        self.num_cached_tokens = 0  # prefix-cache hit at the first admission
        self.num_preemptions = 0
        self.seed = seed  # keys a seeded request's sampling noise (mlx_serve.sampler)
        self.text = ""
        self.logprobs: list[dict[int, float]] = []  # per output token: id -> logprob
        # per prompt position (SamplingParams.prompt_logprobs): id -> logprob, filled as the
        # prompt is computed; a recomputation after preemption writes the same values again
        self.prompt_logprobs: list[dict[int, float] | None] | None = (
            [None] * len(self.prompt_token_ids) if params.prompt_logprobs is not None else None)
        self.cumulative_logprob = 0.0
        self.stop_reason: int | str | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}#{self.index}, {self.status.value}, "
                f"{self.num_computed_tokens}/{self.num_tokens} computed)")

    @property
    def prefix_key(self):
        """What, besides the tokens, the keys and values depend on: the adapter and the RoPE
        table (``lora_id``, and ``rope_key`` where set), so the prefix cache shares only equal
        ones."""
        return self.lora_id if self.rope_key is None else (self.lora_id, self.rope_key)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def first_scored_logit(self) -> int | None:
        """The first position whose logits give a wanted prompt log-probability (that of the
        token after it), or None when the request wants none."""
        if self.prompt_logprobs is None:
            return None
        return self.params.prompt_logprobs_start - 1

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def set_status(self, status: SequenceStatus) -> None:
        if status not in _ALLOWED.get(self.status, ()):
            raise InvalidTransition(f"sequence {self.request_id}#{self.index}: cannot go from "
                                    f"{self.status.value} to {status.value}")
        self.status = status
        if status.finished:
            self.finished_time = time.monotonic()

    def append_token(self, token_id: int, logprob: float | None = None,
                     top_logprobs: dict[int, float] | None = None) -> None:
        self.output_token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        if logprob is not None:
            self.cumulative_logprob += logprob
            self.logprobs.append({token_id: logprob, **(top_logprobs or {})})
