"""Sequence state machine and the scheduler: token budget, chunked prefill, preemption, priority."""

import random

import pytest

from mlx_serve.block_manager import BlockManager
from mlx_serve.lora import LoadedLora
from mlx_serve.sampling_params import SamplingParams
from mlx_serve.scheduler import Scheduler, SchedulerConfig
from mlx_serve.sequence import InvalidTransition, Sequence, SequenceStatus
from mlx_serve.spec_decode import NgramProposer, SpeculativeConfig


def _seq(n, request_id="r", priority=0, arrival=None):
    return Sequence(request_id, list(range(n)), SamplingParams(), priority=priority,
                    arrival_time=arrival)


def _run(scheduler, step, token=1):
    """What the engine does after the model ran: count computed tokens, append a sampled one."""
    for seq, n in step.sequences:
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append_token(token)


def test_invalid_transitions_raise():
    seq = _seq(3)
    with pytest.raises(InvalidTransition, match="cannot go from waiting to preempted"):
        seq.set_status(SequenceStatus.PREEMPTED)
    seq.set_status(SequenceStatus.RUNNING)
    seq.set_status(SequenceStatus.FINISHED_LENGTH)
    assert seq.finish_reason == "length"
    with pytest.raises(InvalidTransition):
        seq.set_status(SequenceStatus.RUNNING)


def test_budget_chunks_long_prompts_and_decodes_go_first():
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=10), BlockManager(32, 4))
    long, short = _seq(25, "long"), _seq(3, "short")
    scheduler.add(long)
    scheduler.add(short)
    step = scheduler.schedule()
    assert [(s.request_id, n) for s, n in step.sequences] == [("long", 10)]
    _run(scheduler, step)
    step = scheduler.schedule()
    assert [(s.request_id, n) for s, n in step.sequences] == [("long", 10)]
    _run(scheduler, step)
    step = scheduler.schedule()  # the last 5 of long, then short joins with what is left
    assert [(s.request_id, n) for s, n in step.sequences] == [("long", 5), ("short", 3)]
    _run(scheduler, step)
    step = scheduler.schedule()
    assert [(s.request_id, n) for s, n in step.sequences] == [("long", 1), ("short", 1)]


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget():
    config = SchedulerConfig(max_num_batched_tokens=10, enable_chunked_prefill=False)
    scheduler = Scheduler(config, BlockManager(32, 4))
    scheduler.add(_seq(6, "a"))
    scheduler.add(_seq(6, "b"))
    step = scheduler.schedule()
    assert [(s.request_id, n) for s, n in step.sequences] == [("a", 6)]


def test_max_num_seqs_limits_the_running_set():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=2), BlockManager(32, 4))
    for i in range(3):
        scheduler.add(_seq(4, str(i)))
    assert len(scheduler.schedule().sequences) == 2 and len(scheduler.waiting) == 1


def test_preemption_frees_the_latest_arrival_and_requeues_it_first():
    manager = BlockManager(4, 4)
    scheduler = Scheduler(SchedulerConfig(), manager)
    early, late = _seq(8, "early", arrival=1.0), _seq(8, "late", arrival=2.0)
    scheduler.add(early)
    scheduler.add(late)
    _run(scheduler, scheduler.schedule())  # both prompts fill all 4 blocks
    step = scheduler.schedule()  # early's 9th token needs a 5th block: late is preempted
    assert [s.request_id for s in step.preempted] == ["late"]
    assert [(s.request_id, n) for s, n in step.sequences] == [("early", 1)]
    assert late.status is SequenceStatus.WAITING and scheduler.waiting[0] is late
    assert late.block_ids == [] and late.num_computed_tokens == 0 and late.num_preemptions == 1
    assert late.num_tokens == 9  # recomputed later with its sampled token


def test_priority_policy_orders_admission_and_preempts_the_least_important():
    scheduler = Scheduler(SchedulerConfig(policy="priority", max_num_seqs=1), BlockManager(8, 4))
    scheduler.add(_seq(4, "low", priority=5, arrival=1.0))
    scheduler.add(_seq(4, "high", priority=0, arrival=2.0))
    assert scheduler.schedule().sequences[0][0].request_id == "high"
    with pytest.raises(ValueError, match="policy"):
        SchedulerConfig(policy="lifo")


def test_finish_from_any_queue_frees_blocks():
    manager = BlockManager(8, 4)
    scheduler = Scheduler(SchedulerConfig(), manager)
    running, waiting = _seq(8, "a"), _seq(4, "b")
    scheduler.add(running)
    scheduler.schedule()
    scheduler.add(waiting)
    scheduler.finish(running, SequenceStatus.FINISHED_ABORTED)
    scheduler.finish(waiting, SequenceStatus.FINISHED_ABORTED)
    assert not scheduler.has_unfinished and manager.num_free_blocks == 8


@pytest.mark.parametrize("speculative", [False, True])
def test_random_traffic_keeps_every_cached_token_right_and_leaks_nothing(speculative):
    """Shared prefixes, chat continuations, two adapters, a cache small enough to preempt and
    evict, and n-gram drafts of which a random number is kept: after every step, each computed
    token of each running sequence sits in its slot with the key/value of its own prefix (a slot
    records the adapter and the token ids up to it)."""
    rng = random.Random(0)
    size = 4
    blocks = BlockManager(20 if speculative else 24, size)  # drafts end sequences sooner
    proposer = NgramProposer(SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=2,
                                               prompt_lookup_min=1), 10**6) if speculative else None
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=16), blocks,
                          proposer)
    slots = [[None] * size for _ in range(blocks.num_blocks)]
    adapters = [None, LoadedLora("a", "/a", slot=0, lora_id=1, rank=4)]
    systems = [[rng.randrange(50) for _ in range(rng.randrange(3, 11))] for _ in range(3)]
    finished, live = [], []
    hits = drafted = kept = 0
    for step_index in range(500):
        if rng.random() < 0.3 and len(live) < 10:
            if finished and rng.random() < 0.3:  # the next turn of a finished chat
                earlier = rng.choice(finished)
                prompt, lora = earlier.all_token_ids + [rng.randrange(4)], earlier.lora
            else:
                prompt = rng.choice(systems) + [rng.randrange(4) for _ in range(rng.randrange(1, 6))]
                lora = rng.choice(adapters)
            seq = Sequence(f"r{step_index}", prompt, SamplingParams(), lora=lora)
            scheduler.add(seq)
            live.append(seq)
        step = scheduler.schedule()
        for source, destination, n in blocks.take_pending_copies():  # what the engine does
            slots[destination][:n] = slots[source][:n]
        for seq, n in step.sequences:  # the forward writes the new tokens' keys/values
            tokens = seq.all_token_ids + seq.draft_token_ids
            for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
                slots[seq.block_ids[p // size]][p % size] = (seq.lora_id, *tokens[:p + 1])
        for seq, n in step.sequences:  # as LLMEngine.step: drafts count once kept
            seq.num_computed_tokens += n - len(seq.draft_token_ids)
            blocks.register_full_blocks(seq)
            drafts, seq.draft_token_ids = seq.draft_token_ids, []
            drafted += len(drafts)
            if drafts:
                for token in drafts[:rng.randint(0, len(drafts))]:
                    seq.num_computed_tokens += 1
                    seq.append_token(token)
                    kept += 1
                blocks.register_full_blocks(seq)
        for seq in scheduler.running:
            hits += seq.num_cached_tokens % size != 0  # some prefixes end inside a block
            for p in range(seq.num_computed_tokens):
                assert slots[seq.block_ids[p // size]][p % size] == \
                    (seq.lora_id, *seq.all_token_ids[:p + 1]), (step_index, seq, p)
        for seq, _ in step.sequences:
            if seq.status is SequenceStatus.RUNNING and seq.num_computed_tokens == seq.num_tokens:
                seq.append_token(rng.randrange(4))
                if rng.random() < 0.15 or seq.num_tokens > 28:
                    scheduler.finish(seq, SequenceStatus.FINISHED_LENGTH)
        if live and rng.random() < 0.03:
            victim = rng.choice(live)
            if not victim.is_finished:
                scheduler.finish(victim, SequenceStatus.FINISHED_ABORTED)
        finished += [s for s in live if s.is_finished]
        live = [s for s in live if not s.is_finished]
    for seq in live:
        scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)
    assert scheduler.num_preemptions > 0 and hits > 0
    assert (0 < kept < drafted) == speculative
    assert blocks.num_free_blocks == blocks.num_blocks
    assert all(b.ref_count == 0 for b in blocks.blocks)
    for key, members in blocks.followers.items():  # the partial-match index is consistent
        assert members and all(blocks.blocks[b].follows == key for b in members)
    assert all(blocks.blocks[b].hash == h for h, b in blocks.cached.items())
