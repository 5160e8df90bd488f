"""Sequence state machine and the scheduler: token budget, chunked prefill, preemption, priority."""

import pytest

from mlx_serve.block_manager import BlockManager
from mlx_serve.sampling_params import SamplingParams
from mlx_serve.scheduler import Scheduler, SchedulerConfig
from mlx_serve.sequence import InvalidTransition, Sequence, SequenceStatus


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
