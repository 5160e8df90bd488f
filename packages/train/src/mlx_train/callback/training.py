"""Callbacks that change the optimisation step: gradient accumulation and gradient clipping."""

from __future__ import annotations

import torch

from mlx_train.callback.core import Callback, CancelBatchException


def _bs(yb) -> int:
    first = yb[0] if yb else None
    return first.shape[0] if isinstance(first, torch.Tensor) and first.dim() else 1


class GradientAccumulation(Callback):
    """Step the optimizer once every ``n_acc`` training ITEMS (samples, as in fastai), not batches.

    Each batch's loss is scaled by ``batch_size / n_acc`` before backward, so with a mean loss
    the accumulated gradient is the mean over the ``n_acc`` items: ``bs=4, n_acc=16`` trains
    like ``bs=16``. Between steps, ``before_step`` cancels the batch, which keeps the gradients.
    """

    order = 6  # before MixedPrecision (10): no unscaling of gradients that keep accumulating
    run_valid = False

    def __init__(self, n_acc: int = 32):
        if n_acc < 1:
            raise ValueError(f"n_acc must be at least 1, got {n_acc}")
        self.n_acc = n_acc

    def before_fit(self):
        self.count = 0

    def _items(self) -> int:
        # under data parallelism the step's items are the global batch's (DistributedCallback
        # sets batch_items), so every process steps after the same batches
        items = getattr(self.learn, "batch_items", None)
        return items if items is not None else _bs(self.learn.yb)

    def after_loss(self):
        self.learn.loss_grad = self.learn.loss_grad * (self._items() / self.n_acc)

    def before_step(self):
        self.count += self._items()
        if self.count < self.n_acc:
            raise CancelBatchException()  # skips the step and zero_grad: gradients accumulate
        self.count = 0


class GradientClip(Callback):
    """Clip the gradients' global ``norm_type`` norm to ``max_norm`` before each step (after
    MixedPrecision has unscaled them)."""

    order = 11

    def __init__(self, max_norm: float = 1.0, norm_type: float = 2.0):
        self.max_norm, self.norm_type = max_norm, norm_type

    def before_step(self):
        params = [p for p in self.learn.model.parameters() if p.grad is not None]
        self.last_norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm, self.norm_type)


__all__ = ["GradientAccumulation", "GradientClip"]
