"""Tiny models and synthetic data for the mlx_train tests (everything runs in well under a second)."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mlx_train import DataLoaders, Learner


def classification_data(n: int = 96, n_in: int = 6, n_classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g)
    w = torch.randn(n_in, n_classes, generator=g)
    y = (x @ w + 0.3 * torch.randn(n, n_classes, generator=g)).argmax(-1)
    return TensorDataset(x, y)


def regression_data(n: int = 64, n_in: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g)
    y = x @ torch.randn(n_in, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


class MLP(nn.Module):
    """Linear -> LayerNorm -> ReLU -> (Dropout) -> Linear: weights, biases and a norm layer."""

    def __init__(self, n_in: int = 6, width: int = 16, n_out: int = 3, p: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_in, width), nn.LayerNorm(width), nn.ReLU(),
                                  nn.Dropout(p))
        self.head = nn.Linear(width, n_out)

    def forward(self, x):
        return self.head(self.body(x))


def make_mlp(n_in: int = 6, width: int = 16, n_out: int = 3, p: float = 0.0) -> MLP:
    """A factory that export(model_factory=...) can name."""
    return MLP(n_in, width, n_out, p)


def two_groups(model: MLP):
    return [model.body, model.head]


def make_dls(bs: int = 16, seed: int | None = 0, n: int = 96, **kwargs) -> DataLoaders:
    return DataLoaders.from_dsets(classification_data(n), classification_data(48, seed=1), bs=bs,
                                  seed=seed, **kwargs)


def make_learner(model=None, dls=None, **kwargs) -> Learner:
    kwargs.setdefault("progress", False)
    return Learner(dls or make_dls(), model or MLP(), nn.CrossEntropyLoss(), **kwargs)


def loader_like(dls: DataLoaders, seed: int = 0) -> DataLoader:
    """A plain torch loader that yields the same training batches as make_dls(seed=seed)."""
    ds = dls.train.dataset
    return DataLoader(ds, batch_size=dls.train.dl.batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))

