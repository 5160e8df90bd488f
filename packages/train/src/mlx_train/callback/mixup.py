"""Callbacks that change the inputs while training: ``MixUp`` and ``ProgressiveResize``
(the batch augmentations themselves are in ``mlx_train.augment``)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mlx_train.augment import _check_images
from mlx_train.callback.core import Callback


class MixUp(Callback):
    """MixUp (Zhang et al. 2018) while training: each batch becomes ``lam * x + (1 - lam) *
    x[perm]`` with ``lam ~ Beta(alpha, alpha)`` (folded to ``max(lam, 1 - lam)``, one per batch)
    and a random permutation ``perm``; the loss is ``lam * loss(pred, y) + (1 - lam) *
    loss(pred, y[perm])``. Validation is untouched. Draws from its own ``numpy.random.default_rng(seed)``."""

    order = 20
    run_valid = False

    def __init__(self, alpha: float = 0.4, seed: int | None = None):
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.alpha = alpha
        self.rng = np.random.default_rng(seed)

    def draw(self, n: int) -> tuple[float, torch.Tensor]:
        """``(lam, perm)`` for a batch of ``n`` items (numpy's ``default_rng(seed)``: a beta draw,
        then a permutation)."""
        lam = float(self.rng.beta(self.alpha, self.alpha))
        return max(lam, 1 - lam), torch.from_numpy(self.rng.permutation(n))

    def before_batch(self):
        x = self.learn.xb[0]
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError("MixUp mixes float inputs; the first model input is "
                             f"{getattr(x, 'dtype', type(x).__name__)}")
        self.lam, perm = self.draw(x.shape[0])
        self.perm = perm.to(x.device)
        self.learn.xb = (torch.lerp(x[self.perm], x, self.lam), *self.learn.xb[1:])

    def after_loss(self):
        if not self.learn.yb:
            return
        other = tuple(y[self.perm] for y in self.learn.yb)
        mixed = self.lam * self.learn.loss_grad + (1 - self.lam) * \
            self.learn.loss_func(self.learn.pred, *other)
        self.learn.loss_grad = mixed
        self.learn.loss = mixed.detach().clone()


class ProgressiveResize(Callback):
    """Progressive resizing: train on smaller images first. The side grows linearly from
    ``start`` (a fraction of the full size, or pixels when an int > 1) to the full size over the
    first ``pct`` of training, rounded down to a multiple of ``step`` pixels; batches are resized
    (bilinear, antialiased when shrinking) before the model sees them. Validation runs at the
    current size when ``resize_valid`` (default), else at full size. The model must accept any
    size (e.g. an adaptive pooling head, as ``vision_learner``'s)."""

    order = 5

    def __init__(self, start: float = 0.5, pct: float = 0.5, step: int = 1,
                 resize_valid: bool = True):
        if start <= 0 or (not isinstance(start, int) and start > 1):
            raise ValueError(f"start must be a fraction in (0, 1] or a size in pixels, got {start}")
        if not 0 < pct <= 1:
            raise ValueError(f"pct must be in (0, 1], got {pct}")
        if step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        self.start, self.pct, self.step, self.resize_valid = start, pct, step, resize_valid
        self.sizes: list[tuple[int, int]] = []

    def size_at(self, pct_train: float, full: tuple[int, int]) -> tuple[int, int]:
        """The (height, width) used at ``pct_train`` of training for full-size images ``full``."""
        h, w = full
        frac0 = self.start / max(h, w) if isinstance(self.start, int) and self.start > 1 \
            else float(self.start)
        frac = min(1.0, frac0 + (1 - frac0) * min(pct_train / self.pct, 1.0))
        if frac >= 1.0:
            return full
        return tuple(max(self.step, int(s * frac) // self.step * self.step) for s in (h, w))

    def before_fit(self):
        self.sizes = []

    def before_batch(self):
        x = self.learn.xb[0]
        if not self.learn.training and not self.resize_valid:
            return
        full = tuple(x.shape[-2:])
        size = self.size_at(self.learn.pct_train, full)
        if self.learn.training:
            self.sizes.append(size)
        if size != full:
            x = F.interpolate(_check_images(x), size=size, mode="bilinear", align_corners=False,
                              antialias=True)
            self.learn.xb = (x, *self.learn.xb[1:])


__all__ = ["MixUp", "ProgressiveResize"]
