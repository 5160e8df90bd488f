"""Block manager: allocation, reference counts, prefix caching by chained hashes, LRU eviction."""

import pytest

from mlx_serve.block_manager import BlockManager
from mlx_serve.lora import LoadedLora
from mlx_serve.sampling_params import SamplingParams
from mlx_serve.sequence import Sequence

SQL = LoadedLora("sql", "/adapters/sql", slot=0, lora_id=7, rank=8)
SQL_RELOADED = LoadedLora("sql", "/adapters/sql", slot=0, lora_id=8, rank=8)


def _seq(tokens, lora=None):
    return Sequence("r", list(tokens), SamplingParams(), lora=lora)


def _admit(manager, seq):
    cached = manager.find_cached_prefix(seq)
    hit = len(cached) * manager.block_size
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
    same = _seq(range(12))  # all 3 blocks cached, but the last token must be recomputed
    assert _admit(manager, same) == 8
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
    assert manager.find_cached_prefix(_seq(list(range(8)) + [7])) == blocks[:2]
    # a new sequence needing 3 blocks takes the unhashed block first, then the LRU cached one:
    # the tail of a's prefix goes before its head
    b = _seq(range(200, 211))
    _admit(manager, b)
    left = manager.find_cached_prefix(_seq(list(range(8)) + [7]))
    assert left == blocks[:1]


def test_adapters_separate_prefixes_and_token_check_guards_the_hash():
    manager = BlockManager(8, 4)
    _admit(manager, _seq(range(9), lora=SQL))
    assert manager.find_cached_prefix(_seq(range(9))) == []
    assert manager.find_cached_prefix(_seq(range(9), lora=SQL_RELOADED)) == []  # new weights
    assert len(manager.find_cached_prefix(_seq(range(9), lora=SQL))) == 2
    block = manager.blocks[manager.cached[next(iter(manager.cached))]]
    block.token_ids = (7, 7, 7, 7)  # as if another prefix had collided on the hash
    assert manager.find_cached_prefix(_seq(range(9), lora=SQL)) == []


def test_prefix_caching_off_and_hit_rate():
    off = BlockManager(8, 4, enable_prefix_caching=False)
    _admit(off, _seq(range(9)))
    assert _admit(off, _seq(range(9))) == 0 and off.prefix_hit_rate == 0
    on = BlockManager(8, 4)
    _admit(on, _seq(range(9)))
    _admit(on, _seq(range(9)))
    assert on.prefix_hit_rate == pytest.approx(8 / 18)
