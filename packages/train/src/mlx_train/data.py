"""Data for the Learner: ``DataLoaders`` (train + valid), seeded splitters, ``Normalize``.

Batches are tuples: the first ``n_inp`` elements go to the model, the rest to the loss
(``(x, y)`` by default). Batch transforms (``after_batch``, e.g. ``Normalize``) run on each batch
as the loaders yield it, on the CPU, before the learner moves it to the model's device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset


def as_tuple(batch) -> tuple:
    """A batch as a tuple: lists become tuples, a lone tensor becomes ``(tensor,)``."""
    if isinstance(batch, tuple):
        return batch
    if isinstance(batch, list):
        return tuple(batch)
    if isinstance(batch, dict):
        raise TypeError("dict batches are not supported yet: yield (inputs, targets) tuples")
    return (batch,)


class Normalize:
    """Batch transform ``x -> (x - mean) / std`` on the first element of each batch.

    ``mean`` and ``std`` broadcast against a batch: for features ``[N, F]`` they have shape
    ``[1, F]``; for images ``[N, C, H, W]`` computed with ``axes=(0, 2, 3)``, ``[1, C, 1, 1]``.
    """

    def __init__(self, mean, std):
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)
        if self.mean.shape != self.std.shape:
            raise ValueError(f"Normalize: mean {tuple(self.mean.shape)} and std "
                             f"{tuple(self.std.shape)} must have the same shape")
        if (self.std <= 0).any():
            raise ValueError("Normalize: std must be positive everywhere")

    @classmethod
    def from_batches(cls, batches, axes: Sequence[int] = (0,), eps: float = 1e-7) -> Normalize:
        """Statistics of the inputs (first batch element) over ``axes``: population std, ``+eps``."""
        total = sq = None
        count = 0
        for b in batches:
            x = as_tuple(b)[0].double()
            s, s2 = x.sum(dim=tuple(axes), keepdim=True), (x * x).sum(dim=tuple(axes), keepdim=True)
            total, sq = (s, s2) if total is None else (total + s, sq + s2)
            count += x.numel() // s.numel()
        if total is None:
            raise ValueError("Normalize: no data to compute statistics from")
        mean = total / count
        var = (sq / count - mean * mean).clamp_min(0)
        return cls(mean.float(), (var.sqrt() + eps).float())

    @classmethod
    def from_dataset(cls, dataset: Dataset, axes: Sequence[int] = (0,), bs: int = 1024,
                     collate_fn: Callable | None = None) -> Normalize:
        """Statistics over a dataset (pass the TRAINING split: validation data must not leak)."""
        loader = DataLoader(dataset, batch_size=bs, shuffle=False, collate_fn=collate_fn,
                            generator=torch.Generator())  # draws nothing from the global RNG
        return cls.from_batches(loader, axes)

    def __call__(self, batch: tuple) -> tuple:
        x = batch[0]
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return ((x - mean) / std, *batch[1:])

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std.to(x.device) + self.mean.to(x.device)

    def to_dict(self) -> dict:
        return {"type": "Normalize", "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Normalize:
        return cls(d["mean"], d["std"])

    def __repr__(self) -> str:
        return f"Normalize(mean shape {tuple(self.mean.shape)})"


BATCH_TRANSFORMS = {"Normalize": Normalize}


class Loader:
    """An iterable over a torch ``DataLoader`` (or any sized iterable of batches) that yields
    tuples with the batch transforms applied: first the random augmentations ``aug`` (training
    loaders only, e.g. ``mlx_train.augment``), then ``after_batch``."""

    def __init__(self, dl, after_batch: Sequence[Callable] = (), aug: Sequence[Callable] = ()):
        self.dl = dl
        self.after_batch = list(after_batch)
        self.aug = list(aug)

    def __iter__(self):
        for b in self.dl:
            b = as_tuple(b)
            for tfm in (*self.aug, *self.after_batch):
                b = tfm(b)
            yield b

    def __len__(self) -> int:
        try:
            return len(self.dl)
        except TypeError:
            raise TypeError("the learner needs loaders with a length (len(dl)); got "
                            f"{type(self.dl).__name__}") from None

    @property
    def dataset(self):
        return getattr(self.dl, "dataset", None)

    @property
    def generators(self) -> list[torch.Generator]:
        """The torch generators this loader draws from (saved with the training state)."""
        found = []
        for owner in (self.dl, getattr(self.dl, "sampler", None),
                      getattr(self.dl, "batch_sampler", None),
                      getattr(getattr(self.dl, "batch_sampler", None), "sampler", None), *self.aug):
            g = getattr(owner, "generator", None)
            if isinstance(g, torch.Generator) and all(g is not f for f in found):
                found.append(g)
        return found

    def first(self) -> tuple:
        """The first batch in dataset order (with a batch sampler: its first batch), without
        drawing from any random generator (so without the ``aug`` augmentations)."""
        dl, states = self.dl, []
        if isinstance(dl, DataLoader) and dl.batch_size is not None:
            # its own generator: even a sequential DataLoader draws a base seed per iterator
            dl = DataLoader(dl.dataset, batch_size=dl.batch_size, shuffle=False,
                            collate_fn=dl.collate_fn, generator=torch.Generator())
        elif isinstance(dl, DataLoader):  # a batch sampler: put its generators back afterwards
            states = [(g, g.get_state()) for g in self.generators]
            dl = DataLoader(dl.dataset, batch_sampler=dl.batch_sampler, collate_fn=dl.collate_fn,
                            generator=torch.Generator())
        try:
            for b in Loader(dl, self.after_batch):
                return b
        finally:
            for g, state in states:
                g.set_state(state)
        raise ValueError("the loader is empty")


class DataLoaders:
    """A training and an optional validation loader, sharing batch transforms.

    ``train`` / ``valid`` accept torch ``DataLoader``s (or any sized iterable of batches).
    ``n_inp``: how many leading batch elements are model inputs (default: all but the last,
    or 1 for one-element batches). ``vocab``: class names, used by ``Learner.predict``.
    ``train_tfms``: random augmentations for the training batches only, run before
    ``after_batch`` (see ``mlx_train.augment``).
    """

    def __init__(self, train=None, valid=None, *, after_batch: Sequence[Callable] = (),
                 n_inp: int | None = None, vocab: Sequence | None = None,
                 train_tfms: Sequence[Callable] = ()):
        self.after_batch = list(after_batch)
        self.train_tfms = list(train_tfms)
        self.train = None if train is None else Loader(getattr(train, "dl", train), self.after_batch,
                                                       self.train_tfms)
        self.valid = None if valid is None else Loader(getattr(valid, "dl", valid), self.after_batch)
        self.n_inp = n_inp
        self.vocab = list(vocab) if vocab is not None else None

    @classmethod
    def from_dsets(cls, train_ds: Dataset, valid_ds: Dataset | None = None, bs: int = 64, *,
                   val_bs: int | None = None, shuffle: bool = True, drop_last: bool = False,
                   seed: int | None = None, num_workers: int = 0, collate_fn: Callable | None = None,
                   normalize: bool | Sequence[int] = False, after_batch: Sequence[Callable] = (),
                   sampler=None, **kwargs) -> DataLoaders:
        """Loaders over datasets. ``seed`` gives the training loader its own shuffling generator
        (else shuffling draws from torch's global RNG). ``normalize=True`` (or the axes to reduce,
        e.g. ``(0, 2, 3)`` for images) adds a ``Normalize`` with the TRAINING split's statistics.
        ``sampler`` (e.g. ``mlx_train.samplers.weighted_sampler``) replaces shuffling."""
        if bs < 1:
            raise ValueError(f"bs must be at least 1, got {bs}")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        train = DataLoader(train_ds, batch_size=bs, shuffle=shuffle and sampler is None,
                           sampler=sampler, drop_last=drop_last, num_workers=num_workers,
                           collate_fn=collate_fn, generator=generator)
        valid = None if valid_ds is None else DataLoader(
            valid_ds, batch_size=val_bs or bs, shuffle=False, num_workers=num_workers,
            collate_fn=collate_fn)
        tfms = list(after_batch)
        if normalize is not False:
            axes = (0,) if normalize is True else tuple(normalize)
            tfms.insert(0, Normalize.from_dataset(train_ds, axes, collate_fn=collate_fn))
        return cls(train, valid, after_batch=tfms, **kwargs)

    @classmethod
    def from_dataset(cls, dataset: Dataset, splitter: Callable | None = None, bs: int = 64,
                     **kwargs) -> DataLoaders:
        """Split one dataset with ``splitter`` (default ``RandomSplitter(0.2, seed=42)``)."""
        splitter = splitter or RandomSplitter(0.2, seed=42)
        train_idx, valid_idx = splitter(dataset)
        return cls.from_dsets(Subset(dataset, train_idx), Subset(dataset, valid_idx), bs, **kwargs)

    def __getitem__(self, i: int) -> Loader | None:
        return (self.train, self.valid)[i]

    def one_batch(self) -> tuple:
        """The first training batch (dataset order, transforms applied; draws no random numbers)."""
        if self.train is None:
            raise ValueError("these DataLoaders have no training loader")
        return self.train.first()

    def test_dl(self, items: Sequence, bs: int = 64) -> Loader:
        """A loader over unlabelled inputs (each item a tensor, or a tuple of the model's inputs)."""
        dataset = [tuple(i) if isinstance(i, (tuple, list)) else (i,) for i in items]
        return Loader(DataLoader(dataset, batch_size=bs, shuffle=False), self.after_batch)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v) if v is not None else None}"
                          for k, v in (("train", self.train), ("valid", self.valid)))
        return f"DataLoaders({sizes} batches)"


def _generator(seed: int | None) -> torch.Generator | None:
    return torch.Generator().manual_seed(seed) if seed is not None else None


class RandomSplitter:
    """Split ``n`` items at random into ``(train_idx, valid_idx)``; ``valid_pct`` go to valid.

    With a ``seed`` the split uses its own generator (same split every time, no global RNG
    drawn); without, it draws from torch's global RNG.
    """

    def __init__(self, valid_pct: float = 0.2, seed: int | None = None):
        if not 0 <= valid_pct < 1:
            raise ValueError(f"valid_pct must be in [0, 1), got {valid_pct}")
        self.valid_pct, self.seed = valid_pct, seed

    def __call__(self, items) -> tuple[list[int], list[int]]:
        n = items if isinstance(items, int) else len(items)
        perm = torch.randperm(n, generator=_generator(self.seed)).tolist()
        cut = int(self.valid_pct * n)
        return perm[cut:], perm[:cut]


def _labels_of(items) -> list:
    if isinstance(items, TensorDataset):
        return items.tensors[-1].tolist()
    if isinstance(items, torch.Tensor):
        return items.tolist()
    if isinstance(items, Dataset) or (len(items) and isinstance(items[0], (tuple, list))):
        return [as_tuple(items[i])[-1].item() if isinstance(as_tuple(items[i])[-1], torch.Tensor)
                else as_tuple(items[i])[-1] for i in range(len(items))]
    return list(items)


class StratifiedSplitter:
    """Like ``RandomSplitter`` but keeps each class's share: ``round(valid_pct * n_class)`` of
    every class goes to valid. Call it on labels, or on a dataset whose items end with the label."""

    def __init__(self, valid_pct: float = 0.2, seed: int | None = None):
        if not 0 <= valid_pct < 1:
            raise ValueError(f"valid_pct must be in [0, 1), got {valid_pct}")
        self.valid_pct, self.seed = valid_pct, seed

    def __call__(self, items, labels=None) -> tuple[list[int], list[int]]:
        labels = _labels_of(items if labels is None else labels)
        g = _generator(self.seed)
        by_class: dict = {}
        for i, y in enumerate(labels):
            by_class.setdefault(y, []).append(i)
        train, valid = [], []
        for y in sorted(by_class, key=repr):
            idx = by_class[y]
            perm = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            cut = int(round(self.valid_pct * len(idx)))
            valid += perm[:cut]
            train += perm[cut:]
        return train, valid


__all__ = ["DataLoaders", "Loader", "Normalize", "RandomSplitter", "StratifiedSplitter", "as_tuple"]
