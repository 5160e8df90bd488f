"""``GatherPredsCallback``: collect inputs, predictions and targets of a validation pass."""

from __future__ import annotations

import torch

from mlx_train.callback.core import Callback


def _cat(chunks):
    if not chunks:
        return None
    if isinstance(chunks[0], torch.Tensor):
        try:
            return torch.cat(chunks)
        except RuntimeError:  # ragged (e.g. sequences of different lengths): keep the batches
            return chunks
    if isinstance(chunks[0], (tuple, list)):
        return type(chunks[0])(_cat([c[i] for c in chunks]) for i in range(len(chunks[0])))
    return chunks


def _detach(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, (tuple, list)):
        return type(x)(_detach(o) for o in x)
    return x


def _single(xs: tuple):
    return xs[0] if len(xs) == 1 else xs


class GatherPredsCallback(Callback):
    """Keeps each batch's predictions (and targets, and inputs with ``with_input``), on the CPU."""

    order = 1000
    run_train = False

    def __init__(self, with_input: bool = False):
        self.with_input = with_input
        self.inputs, self.preds, self.targets = [], [], []

    def before_validate(self):
        self.inputs, self.preds, self.targets = [], [], []

    def after_batch(self):
        self.preds.append(_detach(self.learn.pred))
        if self.learn.yb:
            self.targets.append(_detach(_single(self.learn.yb)))
        if self.with_input:
            self.inputs.append(_detach(_single(self.learn.xb)))

    def results(self):
        """``(inputs or None, preds, targets or None)``, batches concatenated."""
        return _cat(self.inputs), _cat(self.preds), _cat(self.targets)


__all__ = ["GatherPredsCallback"]
