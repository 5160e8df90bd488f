"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step gets a token budget. Running sequences are served first (a decode is one token, an
unfinished prompt continues with its next chunk); then waiting sequences join while the budget,
``max_num_seqs`` and free blocks allow. A prompt longer than what is left of the budget is split
into chunks (chunked prefill). When a running sequence needs a block and none is free, the
lowest-priority running sequence (the latest arrival under FCFS) is preempted: its blocks are
freed and it waits to be recomputed. With a proposer (speculative decoding), a decoding sequence
also gets draft tokens, as many as the budget and the free blocks allow (drafts never preempt).
"""

from __future__ import annotations

import bisect
import logging
from collections import deque
from dataclasses import dataclass, field

from mlx_serve.block_manager import BlockManager
from mlx_serve.sequence import Sequence, SequenceStatus

logger = logging.getLogger("mlx_serve")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # or "priority": lower value first, then arrival

    def __post_init__(self):
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling policy must be 'fcfs' or 'priority' (got {self.policy!r})")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")


@dataclass
class ScheduledStep:
    """The sequences of one step with their number of new tokens, in schedule order."""

    sequences: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.sequences)

    def __bool__(self) -> bool:
        return bool(self.sequences)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, proposer=None):
        self.config = config
        self.blocks = block_manager
        self.proposer = proposer  # drafts for decoding sequences (spec_decode.NgramProposer)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def _order(self, seq: Sequence):
        return (seq.priority, seq.arrival_time) if self.config.policy == "priority" else (0, seq.arrival_time)

    def add(self, seq: Sequence) -> None:
        if self.config.policy == "priority":
            keys = [self._order(s) for s in self.waiting]
            self.waiting.insert(bisect.bisect_right(keys, self._order(seq)), seq)
        else:
            self.waiting.append(seq)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n == 1 and self.proposer is not None and self._schedule_drafts(seq, budget):
                step.sequences.append((seq, 1 + len(seq.draft_token_ids)))
                budget -= 1 + len(seq.draft_token_ids)
                i += 1
                continue
            while not self.blocks.allocate(seq, n):
                victim = self.running.pop()  # the lowest priority, never one scheduled already
                self._preempt(victim)
                step.preempted.append(victim)
                if victim is seq:
                    break
            else:
                step.sequences.append((seq, n))
                budget -= n
                i += 1
        if step.preempted:  # no admissions in a step that had to take blocks back
            return step
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if self._twin_in_prefill(seq):  # n > 1: wait, then take the twin's prompt blocks
                break
            cached = self.blocks.find_cached_prefix(seq)
            n = seq.num_tokens - cached.num_tokens(self.blocks.block_size)
            if n > budget:
                if not self.config.enable_chunked_prefill:
                    break
                n = budget
            if not self.blocks.allocate(seq, n, cached):
                break
            self.waiting.popleft()
            seq.set_status(SequenceStatus.RUNNING)
            self._insert_running(seq)
            step.sequences.append((seq, n))
            budget -= n
        return step

    def _twin_in_prefill(self, seq: Sequence) -> bool:
        """Another sequence of the same request (``n`` > 1) is still computing the prompt: once
        it has, its full prompt blocks are in the prefix cache and ``seq`` reuses them instead
        of computing the same prompt again."""
        return self.blocks.enable_prefix_caching and any(
            s.request_id == seq.request_id and s.num_computed_tokens < s.num_prompt_tokens
            for s in self.running)

    def _schedule_drafts(self, seq: Sequence, budget: int) -> bool:
        """Give a decoding sequence its drafts and their blocks; False (no drafts) when there are
        none, or no free blocks for them: drafts never preempt anyone."""
        if seq.guide is not None:  # a draft would have to be checked against the grammar too
            return False
        limit = budget - 1
        if seq.rope_switch is not None:  # no draft at the switch: every token is computed again
            limit = min(limit, seq.rope_switch - seq.num_tokens)
        drafts = self.proposer.propose(seq, limit)
        if not drafts or not self.blocks.allocate(seq, 1 + len(drafts)):
            return False
        seq.draft_token_ids = drafts
        return True

    def _insert_running(self, seq: Sequence) -> None:
        keys = [self._order(s) for s in self.running]
        self.running.insert(bisect.bisect_right(keys, self._order(seq)), seq)

    def _preempt(self, seq: Sequence) -> None:
        seq.set_status(SequenceStatus.PREEMPTED)
        self.blocks.free_sequence(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        if self.num_preemptions == 1 or self.num_preemptions % 50 == 0:
            logger.warning(
                "preempted request %s (recompute): the KV cache (%d blocks of %d tokens) is full; "
                "%d preemptions so far. Give the cache more memory (--kv-cache-memory) or run "
                "fewer sequences at once (--max-num-seqs)", seq.request_id,
                self.blocks.num_blocks, self.blocks.block_size, self.num_preemptions)
        seq.set_status(SequenceStatus.WAITING)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """End ``seq`` (stop, length or abort) wherever it is and free its blocks."""
        seq.set_status(status)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_sequence(seq)
