"""Samplers: class-balanced weighted sampling (for imbalanced classes) and length bucketing (for
variable-length sequences: batches of similar lengths need little padding)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler, WeightedRandomSampler


def class_weights(labels: Sequence, power: float = 1.0) -> torch.Tensor:
    """One weight per item, ``count(class) ** -power``: with ``power=1`` every class is drawn
    equally often in expectation; ``power=0.5`` only halfway (in log space)."""
    labels = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    if not labels:
        raise ValueError("class_weights: no labels")
    counts = Counter(labels)
    return torch.tensor([counts[y] ** -power for y in labels], dtype=torch.float64)


def weighted_sampler(labels: Sequence | None = None, weights: Sequence[float] | None = None,
                     num_samples: int | None = None, replacement: bool = True,
                     seed: int | None = None, power: float = 1.0) -> WeightedRandomSampler:
    """A ``WeightedRandomSampler`` over the training items: pass their ``labels`` (weights from
    ``class_weights(labels, power)``) or per-item ``weights``. Draws ``num_samples`` items per
    epoch (default: as many as there are items) from its own generator (``seed``). Use it as
    ``DataLoaders.from_dsets(train_ds, valid_ds, sampler=weighted_sampler(train_labels, seed=0))``;
    validation is never resampled."""
    if (labels is None) == (weights is None):
        raise ValueError("weighted_sampler: pass exactly one of labels= and weights=")
    w = class_weights(labels, power) if weights is None else torch.as_tensor(weights,
                                                                              dtype=torch.float64)
    if w.dim() != 1 or len(w) == 0 or (w < 0).any() or not torch.isfinite(w).all() or w.sum() <= 0:
        raise ValueError("weighted_sampler: weights must be a non-empty 1-D list of finite, "
                         "non-negative numbers with a positive sum")
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return WeightedRandomSampler(w, num_samples or len(w), replacement=replacement, generator=g)


class BucketSampler(Sampler[list[int]]):
    """Batches of indices whose items have similar ``lengths`` (a batch sampler).

    With ``shuffle``: shuffle all items, cut them into chunks of ``bs * bucket_mult`` items, sort
    each chunk by length (longest first), cut it into batches, and shuffle the batches (the first
    batch is the longest overall, as fastai's SortishSampler does, so memory errors show at once).
    Without: sort everything by length, longest first. Every item appears exactly once per epoch.
    Use it as ``DataLoader(ds, batch_sampler=BucketSampler(lengths, bs, seed=0), collate_fn=...)``.
    """

    def __init__(self, lengths: Sequence[int], bs: int, shuffle: bool = True,
                 bucket_mult: int = 50, drop_last: bool = False, seed: int | None = None):
        if bs < 1:
            raise ValueError(f"bs must be at least 1, got {bs}")
        if bucket_mult < 1:
            raise ValueError(f"bucket_mult must be at least 1, got {bucket_mult}")
        self.lengths = [int(n) for n in lengths]
        self.bs, self.shuffle, self.bucket_mult, self.drop_last = bs, shuffle, bucket_mult, drop_last
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def _batches(self, idx: list[int]) -> list[list[int]]:
        batches = [idx[i:i + self.bs] for i in range(0, len(idx), self.bs)]
        if self.drop_last and batches and len(batches[-1]) < self.bs:
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        n = len(self.lengths)
        if not self.shuffle:
            yield from self._batches(sorted(range(n), key=lambda i: -self.lengths[i]))
            return
        g = self.generator
        perm = torch.randperm(n, generator=g).tolist()
        chunk = self.bs * self.bucket_mult
        batches = []
        for start in range(0, n, chunk):
            part = sorted(perm[start:start + chunk], key=lambda i: -self.lengths[i])
            batches += self._batches(part)
        if not batches:
            return
        longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]])
        first = batches.pop(longest)
        order = torch.randperm(len(batches), generator=g).tolist()
        yield first
        yield from (batches[i] for i in order)

    def __len__(self) -> int:
        n = len(self.lengths)
        if not self.shuffle:
            return n // self.bs if self.drop_last else -(-n // self.bs)
        chunk = self.bs * self.bucket_mult
        sizes = [min(chunk, n - s) for s in range(0, n, chunk)]
        return sum(s // self.bs if self.drop_last else -(-s // self.bs) for s in sizes)


__all__ = ["BucketSampler", "class_weights", "weighted_sampler"]
