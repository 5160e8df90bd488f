"""Class-balanced weighted sampling and length bucketing."""

from collections import Counter

import pytest
import torch
from torch.utils.data import TensorDataset

from mlx_train import DataLoaders
from mlx_train.samplers import BucketSampler, class_weights, weighted_sampler


def test_class_weights_by_hand():
    w = class_weights([0, 0, 0, 1, 2, 2])
    assert w.tolist() == pytest.approx([1 / 3] * 3 + [1.0] + [0.5] * 2)
    assert class_weights(torch.tensor([1, 1, 0, 0, 0, 0]), power=0.5).tolist() == \
        pytest.approx([2 ** -0.5] * 2 + [0.5] * 4)


def test_weighted_sampler_balances_an_imbalanced_training_set():
    labels = torch.tensor([0] * 90 + [1] * 10)
    ds = TensorDataset(torch.randn(100, 3), labels)
    sampler = weighted_sampler(labels, seed=0)
    dls = DataLoaders.from_dsets(ds, ds, bs=50, sampler=sampler)
    drawn = Counter()
    for _ in range(20):
        for _, yb in dls.train:
            drawn.update(yb.tolist())
    share = drawn[1] / sum(drawn.values())
    assert 0.45 < share < 0.55  # vs 0.10 without the sampler
    assert sum(drawn.values()) == 20 * 100  # num_samples defaults to the number of items
    assert sampler.generator in dls.train.generators  # saved with the training state
    assert [yb.tolist() for _, yb in dls.valid][0] == labels[:50].tolist()  # valid untouched
    again = DataLoaders.from_dsets(ds, ds, bs=50, sampler=weighted_sampler(labels, seed=0))
    first = [yb.tolist() for _, yb in again.train]
    assert first == [yb.tolist() for _, yb in DataLoaders.from_dsets(
        ds, ds, bs=50, sampler=weighted_sampler(labels, seed=0)).train]  # seeded
    with pytest.raises(ValueError, match="exactly one of labels= and weights="):
        weighted_sampler()
    with pytest.raises(ValueError, match="non-negative"):
        weighted_sampler(weights=[1.0, -1.0])


def test_bucket_sampler_covers_every_item_once_with_little_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (1000,), generator=g).tolist()
    sampler = BucketSampler(lengths, bs=32, bucket_mult=10, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 32  # ceil(320/32)*3 + ceil(40/32)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert lengths[batches[0][0]] == max(lengths)  # the longest batch comes first
    assert batches == list(BucketSampler(lengths, bs=32, bucket_mult=10, seed=0))
    assert batches != list(sampler)  # the generator moves on: a new order each epoch

    def padding(bs_):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs_)

    perm = torch.randperm(1000, generator=g).tolist()
    random_batches = [perm[i:i + 32] for i in range(0, 1000, 32)]
    assert padding(batches) < 0.2 * padding(random_batches)
    ordered = list(BucketSampler(lengths, bs=32, shuffle=False))
    assert [lengths[b[0]] for b in ordered] == sorted((lengths[b[0]] for b in ordered), reverse=True)
    dropped = BucketSampler(lengths, bs=32, bucket_mult=10, drop_last=True, seed=0)
    assert len(list(dropped)) == len(dropped) == 31 and all(len(b) == 32 for b in dropped)
    with pytest.raises(ValueError, match="bs must be at least 1"):
        BucketSampler(lengths, bs=0)


def test_first_batch_of_a_bucketed_loader_draws_nothing():
    from torch.utils.data import DataLoader

    from mlx_train.text import PadCollate

    items = [([1] * n, 0) for n in range(1, 41)]
    sampler = BucketSampler([len(s) for s, _ in items], bs=8, seed=0)
    dls = DataLoaders(DataLoader(items, batch_sampler=sampler, collate_fn=PadCollate()))
    state = sampler.generator.get_state()
    ids, mask, _ = dls.one_batch()
    assert torch.equal(sampler.generator.get_state(), state)
    assert ids.shape[0] == 8 and int(mask.sum(1).max()) == 40  # the longest batch comes first
    assert [b[0].shape for b in dls.train][0] == ids.shape  # training starts from the same state
