"""Tensor parallelism (mlx_core.transforms.tensor_parallel): two gloo ranks on this CPU give the
whole model's logits (within 1e-4) and its greedy tokens, in every family."""

from __future__ import annotations

import numpy
import pytest
import torch

from mlx_core.transforms.tensor_parallel import even_split, head_ranges
from tests.core.tensor_parallel_ranks import (
    run_ranks,
    sharded_logits_and_tokens,
    sharded_quantized_logits,
)

FAMILIES = ["tiny-llama", "tiny-llama3", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-olmo2",
            "tiny-phi3", "tiny-phi3-longrope", "tiny-llama-dynamic-rope", "tiny-gemma2",
            "tiny-gemma3", "tiny-mixtral", "tiny-qwen3-moe", "tiny-deepseek-v2",
            "tiny-deepseek-v3", "tiny-gpt2"]


def test_even_split_covers_everything_once():
    for total in (1, 5, 9, 49152):
        for world in (1, 2, 3, 4):
            spans = [even_split(total, world, r) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
            assert max(hi - lo for lo, hi in spans) - min(hi - lo for lo, hi in spans) <= 1


def test_head_ranges_keep_gqa_groups_whole():
    # SmolLM2: 9 query heads over 3 KV heads on 2 ranks -> 2 + 1 groups
    assert [head_ranges(9, 3, 2, r) for r in range(2)] == [((0, 6), (0, 2)), ((6, 9), (2, 3))]
    # fewer KV heads than ranks: each rank the query heads of one KV head
    assert [head_ranges(8, 2, 4, r) for r in range(4)] == [
        ((0, 2), (0, 1)), ((2, 4), (0, 1)), ((4, 6), (1, 2)), ((6, 8), (1, 2))]
    with pytest.raises(ValueError, match="does not split"):
        head_ranges(6, 2, 4, 1)
    with pytest.raises(ValueError, match="at most 4 ranks"):
        head_ranges(4, 1, 8, 0)


def test_two_ranks_match_the_whole_model_in_every_family():
    results = run_ranks(sharded_logits_and_tokens, 2, FAMILIES)
    for rank, per_family in enumerate(results):
        for family, (difference, same_tokens, _kv_heads) in per_family.items():
            assert difference < 1e-4, (rank, family, difference)
            assert same_tokens, (rank, family)
    # the KV cache holds each rank's heads only
    assert results[0]["tiny-llama"][2] == 1 and results[1]["tiny-llama"][2] == 1


def test_quantized_models_split_into_the_same_numbers():
    cases = [(f, s) for f in ("tiny-llama", "tiny-qwen2", "tiny-gemma3", "tiny-mixtral", "tiny-gpt2")
             for s in ("int8", "int4", "w8a8")]
    ranks = run_ranks(sharded_quantized_logits, 2, cases)
    for case in ranks[0]:
        whole_q, whole_o = ranks[0][case][2]
        shares = [r[case][3] for r in ranks]
        # every rank holds exactly the whole model's numbers: q_proj's rows, o_proj's columns
        assert (numpy.concatenate([q for q, _ in shares]) == whole_q).all(), case
        assert (numpy.concatenate([o for _, o in shares], axis=1) == whole_o).all(), case
        for rank in ranks:
            difference, largest = rank[case][:2]
            # the CPU int8 kernels take bf16 activations, and summing the ranks' partial
            # outputs rounds them in another order; W8A8 also scales each rank's slice of a
            # row-parallel input on its own
            assert difference < (0.05 if case.endswith("w8a8") else 0.03) * largest, (
                case, difference, largest)


@pytest.mark.parametrize("world_size", [2, 3])
def test_shared_memory_collectives_give_the_same_model(world_size):
    from mlx_core.transforms.shm_collectives import ShmExchange

    # room for the hidden states of the prompt; the logits' gather falls back to gloo or not
    shm = ShmExchange(world_size, capacity=7 * 64)
    families = ["tiny-llama", "tiny-gpt2", "tiny-mixtral", "tiny-deepseek-v3"]
    for per_family in run_ranks(sharded_logits_and_tokens, world_size, families, shm):
        for family, (difference, same_tokens, _kv_heads) in per_family.items():
            assert difference < 1e-4 and same_tokens, (family, difference)
    assert int(shm.published.min()) > 0  # they did go through shared memory


def test_a_rank_that_never_arrives_fails_the_wait_in_time():
    import time

    from mlx_core.transforms.shm_collectives import ShmExchange

    shm = ShmExchange(2, capacity=4, timeout_s=0.5).bind(0)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="did not reach collective 1 within"):
        shm.all_reduce(torch.ones(4))
    assert time.monotonic() - started < 5
    shm = ShmExchange(2, capacity=4).bind(0)

    def gone():
        raise RuntimeError("rank 1 exited")

    shm.alive = gone  # a peer known dead ends the wait at once
    with pytest.raises(RuntimeError, match="rank 1 exited"):
        shm.all_reduce(torch.ones(4))
