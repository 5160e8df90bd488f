"""Block manager: allocation, reference counts, prefix caching by chained hashes (whole blocks
shared, a block's leading tokens copied), LRU eviction."""

import pytest

from mlx_serve.block_manager import NO_PREFIX, BlockManager, CachedPrefix
from mlx_serve.lora import LoadedLora
from mlx_serve.sampling_params import SamplingParams
from mlx_serve.sequence import Sequence

SQL = LoadedLora("sql", "/adapters/sql", slot=0, lora_id=7, rank=8)
SQL_RELOADED = LoadedLora("sql", "/adapters/sql", slot=0, lora_id=8, rank=8)


def _seq(tokens, lora=None):
    return Sequence("r", list(tokens), SamplingParams(), lora=lora)


def _admit(manager, seq):
    cached = manager.find_cached_prefix(seq)
    hit = cached.num_tokens(manager.block_size)
    assert manager.allocate(seq, seq.num_tokens - hit, cached)
    seq.num_computed_tokens = seq.num_tokens
    manager.register_full_blocks(seq)
    return hit


def test_allocation_counts_blocks_and_refuses_without_changing_anything():
    manager = BlockManager(4, 4)
    seq = _seq(range(10))  # 3 blocks
    assert manager.allocate(seq, 10)
    assert len(seq.block_ids) == 3 and manager.num_free_blocks == 1
    other = _seq(range(100, 109))
    assert not manager.allocate(other, 9)  # needs 3, one is free
    assert other.block_ids == [] and manager.num_free_blocks == 1
    manager.free_sequence(seq)
    assert manager.num_free_blocks == 4


def test_prefix_is_shared_with_reference_counts_and_never_covers_the_last_token():
    manager = BlockManager(8, 4)
    first = _seq(range(12))
    assert _admit(manager, first) == 0
    second = _seq(list(range(8)) + [50, 51, 52])
    assert _admit(manager, second) == 8  # two shared blocks
    assert second.block_ids[:2] == first.block_ids[:2]
    assert [manager.blocks[b].ref_count for b in first.block_ids] == [2, 2, 1]
    same = _seq(range(12))  # all 3 blocks cached, but the last token must be recomputed:
    assert _admit(manager, same) == 11  # 2 blocks shared, 3 tokens of the third copied
    assert same.block_ids[:2] == first.block_ids[:2] and same.block_ids[2] != first.block_ids[2]
    assert manager.take_pending_copies() == [(first.block_ids[2], same.block_ids[2], 3)]
    for seq in (first, second, same):
        manager.free_sequence(seq)
    assert manager.num_free_blocks == 8
    assert all(b.ref_count == 0 for b in manager.blocks)


def test_freed_blocks_stay_cached_until_evicted_least_recently_used_first():
    manager = BlockManager(4, 4)
    a = _seq(list(range(8)) + [99])
    _admit(manager, a)
    blocks = list(a.block_ids)
    manager.free_sequence(a)
    assert manager.find_cached_prefix(_seq(list(range(8)) + [7])).block_ids == tuple(blocks[:2])
    # a new sequence needing 3 blocks takes the unhashed block first, then the LRU cached one:
    # the tail of a's prefix goes before its head
    b = _seq(range(200, 211))
    _admit(manager, b)
    left = manager.find_cached_prefix(_seq(list(range(8)) + [7]))
    assert left.block_ids == tuple(blocks[:1]) and left.partial_tokens == 0


def test_adapters_separate_prefixes_and_token_check_guards_the_hash():
    manager = BlockManager(8, 4)
    _admit(manager, _seq(range(9), lora=SQL))
    assert manager.find_cached_prefix(_seq(range(9))) == NO_PREFIX
    assert manager.find_cached_prefix(_seq(range(9), lora=SQL_RELOADED)) == NO_PREFIX  # new weights
    assert len(manager.find_cached_prefix(_seq(range(9), lora=SQL)).block_ids) == 2
    assert manager.find_cached_prefix(_seq(range(3))) == NO_PREFIX  # partial: adapters apart too
    assert manager.find_cached_prefix(_seq(range(3), lora=SQL)).partial_tokens == 2
    block = manager.blocks[manager.cached[next(iter(manager.cached))]]
    block.token_ids = (7, 7, 7, 7)  # as if another prefix had collided on the hash
    assert manager.find_cached_prefix(_seq(range(9), lora=SQL)) == NO_PREFIX


def test_prefix_caching_off_and_hit_rate():
    off = BlockManager(8, 4, enable_prefix_caching=False)
    _admit(off, _seq(range(9)))
    assert _admit(off, _seq(range(9))) == 0 and off.prefix_hit_rate == 0
    on = BlockManager(8, 4)
    _admit(on, _seq(range(9)))
    _admit(on, _seq(range(9)))
    assert on.prefix_hit_rate == pytest.approx(8 / 18)
    _admit(on, _seq(list(range(6)) + [60, 61]))  # a block and 2 tokens of the next
    assert on.prefix_hit_rate == pytest.approx((8 + 6) / (18 + 8))


def test_a_prefix_ending_inside_a_block_copies_the_longest_matching_run():
    manager = BlockManager(16, 4)
    system = [1, 2, 3, 4, 5, 6]  # ends in the middle of the second block
    first = _seq(system + [10, 11, 12])
    _admit(manager, first)
    other = _seq(system + [20, 21, 12])  # second block (5, 6, 20, 21): shares 2 tokens
    _admit(manager, other)
    longer = _seq(system + [10, 30])  # shares 3 tokens of first's second block, not other's 2
    prefix = manager.find_cached_prefix(longer)
    assert prefix == CachedPrefix((first.block_ids[0],), first.block_ids[1], 3)
    assert manager.take_pending_copies() == [(first.block_ids[1], other.block_ids[1], 2)]
    assert manager.allocate(longer, longer.num_tokens - 7, prefix)
    assert longer.num_computed_tokens == 7 and longer.num_cached_tokens == 7
    assert longer.block_ids[0] == first.block_ids[0]
    # the copy goes into a block of longer's own; the source stays cached and shared by nobody
    assert longer.block_ids[1] not in first.block_ids + other.block_ids
    assert manager.take_pending_copies() == [(first.block_ids[1], longer.block_ids[1], 3)]
    assert manager.blocks[first.block_ids[1]].ref_count == 1


def test_the_partly_filled_last_block_of_a_sequence_that_left_is_offered_too():
    manager = BlockManager(8, 4)
    turn = _seq([1, 2, 3, 4, 5, 6])
    _admit(manager, turn)
    turn.append_token(7)  # generated; its key/value is never computed
    turn.append_token(8)
    turn.num_computed_tokens = 7
    manager.register_full_blocks(turn)
    assert manager.find_cached_prefix(_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])).partial_tokens == 0
    head, tail = turn.block_ids
    manager.free_sequence(turn)  # its second block holds 5, 6, 7: copyable from now on
    assert next(iter(manager.free)) != tail  # and kept like a cached block, not reused first
    again = _seq([1, 2, 3, 4, 5, 6, 7, 8, 9])  # the next turn of the chat
    assert manager.find_cached_prefix(again) == CachedPrefix((head,), tail, 3)
    assert _admit(manager, again) == 7
    assert manager.take_pending_copies()[-1] == (tail, again.block_ids[1], 3)


def test_evicted_or_reset_blocks_are_no_longer_offered_for_partial_reuse():
    manager = BlockManager(3, 4)
    a = _seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    _admit(manager, a)
    manager.free_sequence(a)
    assert manager.find_cached_prefix(_seq([1, 2, 3, 4, 5, 6, 0])).partial_tokens == 2
    b = _seq(range(100, 111))  # takes every block: both cached ones are evicted
    _admit(manager, b)
    assert manager.find_cached_prefix(_seq([1, 2, 3, 4, 5, 6, 0])) == NO_PREFIX
    assert manager.followers.keys() == {(None, None, 100), (manager.blocks[b.block_ids[0]].hash,
                                                           None, 104)}
    manager.free_sequence(b)
    manager.reset_prefix_cache()
    assert manager.followers == {} and manager.cached == {}
    assert manager.find_cached_prefix(_seq(range(100, 103))) == NO_PREFIX
