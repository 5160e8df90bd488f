"""DataLoaders, splitters and Normalize."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mlx_train import DataLoaders, Normalize, RandomSplitter, StratifiedSplitter

from .helpers import classification_data


def test_from_dsets_batches_shuffling_and_one_batch():
    train, valid = classification_data(50), classification_data(20, seed=1)
    dls = DataLoaders.from_dsets(train, valid, bs=16, seed=3)
    assert len(dls.train) == 4 and len(dls.valid) == 2 and dls[1] is dls.valid
    first = [b[1] for b in dls.train]
    assert [b[1] for b in DataLoaders.from_dsets(train, valid, bs=16, seed=3).train][0].tolist() \
        == first[0].tolist()  # the seed fixes the order
    assert sorted(torch.cat(first).tolist()) == sorted(train.tensors[1].tolist())
    state = torch.get_rng_state()
    gen_state = dls.train.generators[0].get_state()
    xb, yb = dls.one_batch()
    assert torch.equal(xb, train.tensors[0][:16])  # dataset order
    assert torch.equal(torch.get_rng_state(), state)  # ... and no random numbers drawn
    assert torch.equal(dls.train.generators[0].get_state(), gen_state)
    v = [b[1] for b in dls.valid]
    assert torch.equal(torch.cat(v), valid.tensors[1])  # validation is never shuffled
    assert "train=4" in repr(dls)
    with pytest.raises(ValueError, match="bs must be at least 1"):
        DataLoaders.from_dsets(train, bs=0)


def test_wrapping_plain_loaders_and_batch_shapes():
    ds = classification_data(10)
    dls = DataLoaders(DataLoader(ds, batch_size=4), [[torch.ones(2, 6), torch.zeros(2)]])
    assert isinstance(next(iter(dls.train)), tuple) and len(dls.valid) == 1
    loader = DataLoaders(DataLoader(TensorDataset(torch.ones(3, 2)), batch_size=3)).train
    assert len(next(iter(loader))) == 1

    with pytest.raises(TypeError, match="dict batches"):
        next(iter(DataLoaders([{"x": 1}]).train))


def test_random_splitter_is_seeded_and_complete():
    tr, va = RandomSplitter(0.25, seed=0)(range(40))
    assert (tr, va) == RandomSplitter(0.25, seed=0)(40)
    assert len(va) == 10 and sorted(tr + va) == list(range(40))
    assert RandomSplitter(0.25, seed=1)(40) != (tr, va)
    torch.manual_seed(0)
    a = RandomSplitter(0.25)(40)
    torch.manual_seed(0)
    assert RandomSplitter(0.25)(40) == a  # unseeded: the global RNG
    with pytest.raises(ValueError, match=r"valid_pct must be in \[0, 1\)"):
        RandomSplitter(1.0)


def test_stratified_splitter_keeps_class_shares():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    tr, va = StratifiedSplitter(0.2, seed=0)(labels)
    assert sorted(tr + va) == list(range(100))
    assert [sum(labels[i] == c for i in va) for c in range(3)] == [10, 6, 4]
    ds = TensorDataset(torch.randn(100, 2), torch.tensor(labels))
    assert StratifiedSplitter(0.2, seed=0)(ds) == (tr, va)  # labels read from the dataset
    dls = DataLoaders.from_dataset(ds, StratifiedSplitter(0.2, seed=0), bs=10)
    assert len(dls.valid.dataset) == 20


def test_normalize_uses_training_statistics_only():
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(200, 3, generator=g) * torch.tensor([1.0, 5.0, 0.1]) + 3,
                          torch.zeros(200))
    valid = TensorDataset(torch.randn(50, 3, generator=g) * 100, torch.zeros(50))
    dls = DataLoaders.from_dsets(train, valid, bs=64, normalize=True)
    norm = dls.after_batch[0]
    x = train.tensors[0].double()
    assert torch.allclose(norm.mean.double(), x.mean(0, keepdim=True), atol=1e-5)
    assert torch.allclose(norm.std.double(), x.std(0, unbiased=False, keepdim=True) + 1e-7, atol=1e-5)
    xb = torch.cat([b[0] for b in dls.train])
    assert torch.allclose(xb.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(xb.std(0, unbiased=False), torch.ones(3), atol=1e-4)
    assert torch.allclose(norm.decode(norm((xb,))[0]), xb, atol=1e-4)
    images = torch.randn(8, 2, 4, 4) + torch.tensor([1.0, -1.0]).view(1, 2, 1, 1)
    stats = Normalize.from_batches([(images,)], axes=(0, 2, 3))
    assert stats.mean.shape == (1, 2, 1, 1)
    assert Normalize.from_dict(stats.to_dict()).mean.tolist() == stats.mean.tolist()
    with pytest.raises(ValueError, match="std must be positive"):
        Normalize([0.0], [0.0])
