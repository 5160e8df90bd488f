"""Callbacks that change the inputs while training: ``MixUp``, ``CutMix`` and
``ProgressiveResize`` (the batch augmentations themselves are in ``mlx_train.augment``)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mlx_train.augment import _check_images
from mlx_train.callback.core import Callback


def _numpy_rng(seed: int | None) -> np.random.Generator:
    if seed is None:  # one draw from torch's global RNG (torch.manual_seed reproduces the run)
        seed = int(torch.randint(0, 2**62, (1,)))
    return np.random.default_rng(seed)


def _hex_ints(v):
    """numpy's bit-generator state as JSON that any reader keeps exact: ints past 2**53 (PCG64's
    128-bit state and increment) as hex strings."""
    if isinstance(v, dict):
        return {k: _hex_ints(o) for k, o in v.items()}
    return hex(v) if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 2**53 else v


def _unhex_ints(v):
    if isinstance(v, dict):
        return {k: _unhex_ints(o) for k, o in v.items()}
    return int(v, 16) if isinstance(v, str) and v.startswith(("0x", "-0x")) else v


class MixUp(Callback):
    """MixUp (Zhang et al. 2018) while training: each batch becomes ``lam * x + (1 - lam) *
    x[perm]`` with ``lam ~ Beta(alpha, alpha)`` (folded to ``max(lam, 1 - lam)``, one per batch)
    and a random permutation ``perm``; the loss is ``lam * loss(pred, y) + (1 - lam) *
    loss(pred, y[perm])``. Validation is untouched. Draws from its own
    ``numpy.random.default_rng(seed)`` (``seed=None``: a seed drawn once from torch's global RNG);
    ``learn.save`` stores that generator's state (``state_dict``), so a resumed run draws on."""

    order = 20
    run_valid = False

    def __init__(self, alpha: float = 0.4, seed: int | None = None):
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.alpha = alpha
        self.rng = _numpy_rng(seed)

    def state_dict(self) -> dict:
        """The generator's state, for ``learn.save`` (JSON: numpy's bit-generator state)."""
        return {"rng": _hex_ints(self.rng.bit_generator.state)}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = _unhex_ints(state["rng"])

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


class CutMix(MixUp):
    """CutMix (Yun et al. 2019) while training: in each batch, a box of every image is replaced
    by the same box of ``x[perm]``. ``lam ~ Beta(alpha, alpha)`` sets the box's area to about
    ``(1 - lam)`` of the image (sides ``sqrt(1 - lam)`` of the height and width), its centre is
    uniform over the pixels and it is clipped at the borders; ``lam`` then becomes the fraction of
    pixels kept and the loss is ``lam * loss(pred, y) + (1 - lam) * loss(pred, y[perm])``, as
    ``MixUp``'s. Inputs: images ``[N, C, H, W]``. Draws (beta, permutation, centre row, centre
    column per batch) from its own ``numpy.random.default_rng(seed)``, saved by ``learn.save``."""

    def __init__(self, alpha: float = 1.0, seed: int | None = None):
        super().__init__(alpha, seed)

    def box(self, lam: float, h: int, w: int) -> tuple[int, int, int, int]:
        """``(top, bottom, left, right)`` of a box of about ``1 - lam`` of an ``h x w`` image
        (draws its centre)."""
        cut = np.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(self.rng.integers(h)), int(self.rng.integers(w))
        return (max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0),
                min(cx + cw // 2, w))

    def before_batch(self):
        x = _check_images(self.learn.xb[0])
        n, _, h, w = x.shape
        lam = float(self.rng.beta(self.alpha, self.alpha))
        self.perm = torch.from_numpy(self.rng.permutation(n)).to(x.device)
        top, bottom, left, right = self.box(lam, h, w)
        x = x.clone()
        x[:, :, top:bottom, left:right] = x[self.perm][:, :, top:bottom, left:right]
        self.lam = 1.0 - (bottom - top) * (right - left) / (h * w)
        self.learn.xb = (x, *self.learn.xb[1:])


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


__all__ = ["CutMix", "MixUp", "ProgressiveResize"]
