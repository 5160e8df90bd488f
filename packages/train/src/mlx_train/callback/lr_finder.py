"""The learning-rate finder: ``LRFinder``, the suggestion rules and ``lr_find``."""

from __future__ import annotations

import collections
import copy
import math
from pathlib import Path

import numpy as np
import torch

from mlx_train.callback.core import CancelFitException, CancelValidException
from mlx_train.callback.schedule import ParamScheduler, SchedExp
from mlx_train.plotting import new_figure


class LRFinder(ParamScheduler):
    """Train with an exponentially growing lr from ``start_lr`` to ``end_lr`` over ``num_it``
    batches, stopping early when the smoothed loss exceeds 4x its best (``stop_div``); skips
    validation and puts the model and optimizer back as they were at the end."""

    skips_validation = True

    def __init__(self, start_lr=1e-7, end_lr=10, num_it: int = 100, stop_div: bool = True):
        num_it = max(num_it, 6)
        if np.ndim(start_lr) or np.ndim(end_lr):
            start_lr, end_lr = np.asarray(start_lr, float), np.asarray(end_lr, float)
        super().__init__({"lr": SchedExp(start_lr, end_lr)})
        self.num_it, self.stop_div = num_it, stop_div

    def before_fit(self):
        super().before_fit()
        self._model_state = {k: v.detach().clone() for k, v in self.learn.model.state_dict().items()}
        self._opt_state = copy.deepcopy(self.learn.opt.state_dict())
        self.best_loss = float("inf")

    def before_batch(self):
        self._update(self.learn.train_iter / self.num_it)

    def after_batch(self):
        super().after_batch()
        smooth = self.learn.smooth_loss
        if smooth < self.best_loss:
            self.best_loss = smooth
        if self.stop_div and (smooth > 4 * self.best_loss or math.isnan(smooth)):
            raise CancelFitException()
        if self.learn.train_iter >= self.num_it:
            raise CancelFitException()

    def before_validate(self):
        raise CancelValidException()

    def after_fit(self):
        super().after_fit()
        self.learn.opt.zero_grad()
        self.cleanup()

    def cleanup(self):
        if getattr(self, "_model_state", None) is not None:
            self.learn.model.load_state_dict(self._model_state)
            self.learn.opt.load_state_dict(self._opt_state)
            self._model_state = self._opt_state = None


# -- suggestions: each takes (lrs, losses, num_it) tensors and returns (lr, (x, y) to plot) ----

def valley(lrs: torch.Tensor, losses: torch.Tensor, num_it: int):
    """The lr 1/3 + 1/6 into the longest stretch over which the loss keeps decreasing."""
    n = len(losses)
    run = [1] * n  # longest decreasing subsequence ending at i
    start = end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
            if run[end] < run[i]:
                end, start = i, i - run[i]
    third = (end - start) / 3
    idx = start + int(third) + int(third / 2)
    return float(lrs[idx]), (float(lrs[idx]), float(losses[idx]))


def steep(lrs: torch.Tensor, losses: torch.Tensor, num_it: int):
    """The lr where the loss falls fastest against log(lr)."""
    grads = (losses[1:] - losses[:-1]) / (lrs[1:].log() - lrs[:-1].log())
    i = int(grads.argmin())
    return float(lrs[i]), (float(lrs[i]), float(losses[i]))


def minimum(lrs: torch.Tensor, losses: torch.Tensor, num_it: int):
    """A tenth of the lr at the minimum loss."""
    i = int(losses.argmin())
    return float(lrs[i]) / 10, (float(lrs[i]), float(losses[i]))


def slide(lrs: torch.Tensor, losses: torch.Tensor, num_it: int, lr_diff: int = 15,
          thresh: float = 0.005, adjust_value: float = 1.0):
    """The interval-slide rule: walk left until the loss gradient is flat over ``lr_diff`` steps."""
    grad = np.gradient(losses.numpy())
    r, left = -1, -1 - lr_diff
    found = float(lrs[left])
    while left >= -len(losses) and abs(grad[r] - grad[left]) > thresh:
        found = float(lrs[left])
        r, left = r - 1, left - 1
    lr = found * adjust_value
    y = float(np.interp(np.log10(lr), np.log10(lrs.numpy()), losses.numpy()))
    return lr, (lr, y)


def lr_find(learn, start_lr=1e-7, end_lr=10, num_it: int = 100, stop_div: bool = True,
            show_plot: bool = True, suggest_funcs=(valley, steep, minimum),
            fname: str | Path = "lr_find.png"):
    """Mock training with a growing lr; returns a named tuple of suggested lrs (one field per
    function in ``suggest_funcs``). With ``show_plot`` the loss-vs-lr curve is written to
    ``learn.path / fname`` when matplotlib is installed (else a warning says so)."""
    if learn.dls is None or learn.dls.train is None:
        raise ValueError("lr_find needs training data: the learner's dls has no train loader")
    n_epoch = num_it // len(learn.dls.train) + 1
    with learn.no_logging():
        learn.fit(n_epoch, cbs=LRFinder(start_lr, end_lr, num_it, stop_div))
    rec = learn.recorder
    lrs = torch.tensor(rec.lrs[num_it // 10:-5], dtype=torch.float64)
    losses = torch.tensor(rec.losses[num_it // 10:-5], dtype=torch.float64)
    nan = torch.nonzero(torch.isnan(losses)).flatten()
    if len(nan):
        lrs, losses = lrs[: int(nan[0])], losses[: int(nan[0])]
    funcs = list(suggest_funcs) if isinstance(suggest_funcs, (list, tuple)) else [suggest_funcs]
    if len(losses) < 2 and funcs:
        raise RuntimeError(f"lr_find stopped after {len(rec.losses)} batches, leaving {len(losses)} "
                           "usable losses: the loss diverged at once (lower start_lr) or there are "
                           "too few batches (raise num_it)")
    names = [getattr(getattr(f, "func", f), "__name__", "suggestion") for f in funcs]
    results = [f(lrs, losses, num_it) for f in funcs]
    if show_plot:
        rec.lr_find_plot = plot_lr_find(rec, Path(learn.path) / fname,
                                        [p for _, p in results], names)
    if not funcs:
        return None
    return collections.namedtuple("SuggestedLRs", names)(*[lr for lr, _ in results])


def plot_lr_find(recorder, fname: str | Path, points=(), names=(), skip_end: int = 5):
    """Write loss against lr (log scale) with the suggestions marked; ``None`` without matplotlib."""
    fig, ax = new_figure("lr_find")
    if fig is None:
        return None
    lrs = recorder.lrs[:-skip_end] if skip_end else recorder.lrs
    losses = recorder.losses[:-skip_end] if skip_end else recorder.losses
    ax.plot(lrs, losses)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss (smoothed)")
    for (x, y), name in zip(points, names, strict=False):
        ax.plot([x], [y], "o", label=name)
    if names:
        ax.legend()
    path = Path(fname)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


__all__ = ["LRFinder", "lr_find", "minimum", "plot_lr_find", "slide", "steep", "valley"]
