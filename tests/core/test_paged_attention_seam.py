"""The zoo model over the paged layout (as the serving engine will drive it): packed prefill,
decode, and a prefill that reads a cached prefix all equal the plain forward (1e-5, fp32)."""

import pytest
import torch

from mlx_core import build_model, get_preset
from mlx_core.models.paged import PagedAttentionMetadata, PagedKVCache

BLOCK = 4
TABLES = torch.tensor([[3, 7, -1, -1], [0, 5, 9, 2]], dtype=torch.int32)


def _slots(seq: int, positions) -> list[int]:
    return [int(TABLES[seq, p // BLOCK]) * BLOCK + p % BLOCK for p in positions]


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-mistral", "tiny-mixtral"])
@torch.no_grad()
def test_packed_prefill_and_decode_equal_the_plain_forward(preset):
    torch.manual_seed(0)
    model = build_model(get_preset(preset)).eval()
    window = model.config.sliding_window
    prompts = [torch.randint(0, 128, (5,)), torch.randint(0, 128, (11,))]
    cache = PagedKVCache(model.config, num_blocks=12, block_size=BLOCK)

    ids = torch.cat(prompts)[None]
    positions = torch.cat([torch.arange(len(p)) for p in prompts])[None]
    slots = torch.tensor(_slots(0, range(5)) + _slots(1, range(11)))
    cu = _cu([5, 11])
    meta = PagedAttentionMetadata(cache, slots, TABLES, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                  sliding_window=window)
    packed = model(ids, position_ids=positions, paged=meta)[0]
    for i, prompt in enumerate(prompts):
        torch.testing.assert_close(packed[cu[i]:cu[i + 1]], model(prompt[None])[0], atol=1e-5, rtol=1e-5)

    sequences = [p.tolist() for p in prompts]
    for _ in range(3):  # decode: one token per sequence, packed
        nxt = [int(model(torch.tensor([s]))[0, -1].argmax()) for s in sequences]
        lengths = [len(s) for s in sequences]
        meta = PagedAttentionMetadata(cache, torch.tensor([_slots(i, [n])[0] for i, n in enumerate(lengths)]),
                                      TABLES, sliding_window=window,
                                      context_lens=torch.tensor([n + 1 for n in lengths], dtype=torch.int32))
        logits = model(torch.tensor([nxt]), position_ids=torch.tensor([lengths]), paged=meta)[0]
        for i, token in enumerate(nxt):
            sequences[i].append(token)
            torch.testing.assert_close(logits[i], model(torch.tensor([sequences[i]]))[0, -1],
                                       atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_prefill_reads_a_cached_prefix():
    torch.manual_seed(0)
    model = build_model(get_preset("tiny-llama")).eval()
    prompt = torch.randint(0, 128, (11,))
    cache = PagedKVCache(model.config, num_blocks=12, block_size=BLOCK)
    # the first two blocks (8 tokens) are already cached, as prefix caching would find them
    first = PagedAttentionMetadata(cache, torch.tensor(_slots(1, range(8))), TABLES[1:],
                                   cu_seqlens_q=_cu([8]), cu_seqlens_k=_cu([8]))
    model(prompt[None, :8], position_ids=torch.arange(8)[None], paged=first)
    rest = PagedAttentionMetadata(cache, torch.tensor(_slots(1, range(8, 11))), TABLES[1:],
                                  cu_seqlens_q=_cu([3]), cu_seqlens_k=_cu([11]))
    tail = model(prompt[None, 8:], position_ids=torch.arange(8, 11)[None], paged=rest)[0]
    torch.testing.assert_close(tail, model(prompt[None])[0, 8:], atol=1e-5, rtol=1e-5)


@pytest.mark.triton
@torch.no_grad()
def test_paged_path_through_the_triton_kernels(monkeypatch):
    monkeypatch.setenv("MLX_KERNELS", "triton")
    test_prefill_reads_a_cached_prefix()


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-mistral"])
@torch.no_grad()
def test_one_forward_mixes_decodes_and_prefills(preset):
    """Sequence 0 decodes its 6th token while sequence 1 prefills 11 tokens, in one packed row."""
    torch.manual_seed(0)
    model = build_model(get_preset(preset)).eval()
    window = model.config.sliding_window
    first, second = torch.randint(0, 128, (6,)), torch.randint(0, 128, (11,))
    cache = PagedKVCache(model.config, num_blocks=12, block_size=BLOCK)
    warm = PagedAttentionMetadata(cache, torch.tensor(_slots(0, range(5))), TABLES[:1],
                                  cu_seqlens_q=_cu([5]), cu_seqlens_k=_cu([5]), sliding_window=window)
    model(first[None, :5], position_ids=torch.arange(5)[None], paged=warm)
    meta = PagedAttentionMetadata(cache, torch.tensor(_slots(0, [5]) + _slots(1, range(11))), TABLES,
                                  context_lens=torch.tensor([6], dtype=torch.int32),
                                  cu_seqlens_q=_cu([11]), cu_seqlens_k=_cu([11]), sliding_window=window)
    ids = torch.cat([first[5:], second])[None]
    positions = torch.cat([torch.tensor([5]), torch.arange(11)])[None]
    logits = model(ids, position_ids=positions, paged=meta)[0]
    torch.testing.assert_close(logits[0], model(first[None])[0, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1:], model(second[None])[0], atol=1e-5, rtol=1e-5)


def test_decodes_ordered_by_length_read_only_the_columns_they_use():
    cache = PagedKVCache(get_preset("tiny-llama"), num_blocks=40, block_size=4)

    def groups(lens):
        return PagedAttentionMetadata(cache, torch.zeros(len(lens), dtype=torch.long),
                                      torch.zeros(len(lens), 20, dtype=torch.int32),
                                      context_lens=torch.tensor(lens)).decode_groups

    assert groups([3, 5, 9, 20, 30, 41, 60, 77]) == [(0, 2, 2), (2, 4, 5), (4, 6, 11), (6, 8, 20)]
    assert groups([70, 71, 72, 77]) == [(0, 4, 20)]  # nothing to save: one call
