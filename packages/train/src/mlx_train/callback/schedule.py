"""Hyper-parameter schedules, ``ParamScheduler``, the 1cycle / flat-cos / fine-tune policies and
the learning-rate finder's building blocks (the finder itself is in ``lr_finder``).

A schedule maps a position ``pos`` in ``[0, 1]`` (the share of training done, ``learn.pct_train``)
to a value; values may be numpy arrays (one per layer group). The formulas are fastai's:

- ``SchedLin(a, b)``: ``a + pos * (b - a)``
- ``SchedCos(a, b)``: ``a + (1 + cos(pi * (1 - pos))) * (b - a) / 2``
- ``SchedNo(a, b)``: ``a``
- ``SchedExp(a, b)``: ``a * (b / a) ** pos``
- ``SchedPoly(a, b, power)``: ``a + (b - a) * pos ** power``
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from mlx_train.callback.core import Callback


class _Sched:
    def __init__(self, start, end):
        self.start, self.end = start, end

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.start!r}, {self.end!r})"


class SchedLin(_Sched):
    """Linear from ``start`` to ``end``."""

    def __call__(self, pos: float):
        return self.start + pos * (self.end - self.start)


class SchedCos(_Sched):
    """Cosine from ``start`` to ``end`` (flat at both ends)."""

    def __call__(self, pos: float):
        return self.start + (1 + math.cos(math.pi * (1 - pos))) * (self.end - self.start) / 2


class SchedNo(_Sched):
    """Constant ``start``."""

    def __call__(self, pos: float):
        return self.start


class SchedExp(_Sched):
    """Exponential (geometric) from ``start`` to ``end``."""

    def __call__(self, pos: float):
        return self.start * (self.end / self.start) ** pos


class SchedPoly(_Sched):
    """Polynomial of ``power`` from ``start`` to ``end``."""

    def __init__(self, start, end, power: float):
        super().__init__(start, end)
        self.power = power

    def __call__(self, pos: float):
        return self.start + (self.end - self.start) * pos**self.power


class combine_scheds:  # noqa: N801 - used like the function it is in fastai
    """Run ``scheds[i]`` over the share ``pcts[i]`` of training (``pcts`` sum to 1)."""

    def __init__(self, pcts: Sequence[float], scheds: Sequence[Callable]):
        if len(pcts) != len(scheds):
            raise ValueError(f"combine_scheds: {len(pcts)} pcts for {len(scheds)} schedules")
        if any(p < 0 for p in pcts) or not math.isclose(sum(pcts), 1.0, abs_tol=1e-9):
            raise ValueError(f"combine_scheds: pcts must be non-negative and sum to 1, got {list(pcts)}")
        self.bounds = np.cumsum([0.0, *pcts]).tolist()
        self.scheds = list(scheds)

    def __call__(self, pos: float):
        idx = max(i for i, b in enumerate(self.bounds) if pos >= b) if pos >= 0 else 0
        idx = min(idx, len(self.scheds) - 1)
        width = self.bounds[idx + 1] - self.bounds[idx]
        return self.scheds[idx]((pos - self.bounds[idx]) / width if width > 0 else 0.0)


def combined_cos(pct: float, start, middle, end) -> combine_scheds:
    """Cosine ``start -> middle`` over the first ``pct`` of training, then ``middle -> end``."""
    return combine_scheds([pct, 1 - pct], [SchedCos(start, middle), SchedCos(middle, end)])


class ParamScheduler(Callback):
    """Sets hyper-parameters (``lr``, ``mom``, ``wd``, ...) from schedules before every training
    batch, at ``learn.pct_train``; records the values used in ``self.hps`` (copied to
    ``learn.recorder.hps`` at the end of the fit)."""

    order = 60
    run_valid = False

    def __init__(self, scheds: dict[str, Callable]):
        self.scheds = dict(scheds)

    def before_fit(self):
        for name in self.scheds:
            if not self.learn.opt.supports(name):
                raise ValueError(f"ParamScheduler: the optimizer ({type(self.learn.opt.opt).__name__}) "
                                 f"has no hyper-parameter {name!r}")
        self.hps = {name: [] for name in self.scheds}

    def _update(self, pos: float) -> None:
        for name, f in self.scheds.items():
            self.learn.opt.set_hyper(name, f(pos))

    def before_batch(self):
        self._update(self.learn.pct_train)

    def after_batch(self):
        hypers = self.learn.opt.hypers[-1]
        for name in self.scheds:
            self.hps[name].append(hypers[name])

    def after_fit(self):
        recorder = self.learn.cb("recorder")
        if recorder is not None and hasattr(self, "hps"):
            recorder.hps = self.hps


def _group_lrs(learn, lr) -> np.ndarray:
    if learn.opt is None:
        learn.create_opt()
    learn.opt.set_hyper("lr", learn.lr if lr is None else lr)
    return np.array([h["lr"] for h in learn.opt.hypers])


def fit_one_cycle(learn, n_epoch: int, lr_max=None, div: float = 25.0, div_final: float = 1e5,
                  pct_start: float = 0.25, wd=None, moms=None, cbs=None, reset_opt: bool = False,
                  start_epoch: int = 0) -> None:
    """1cycle: lr warms up (cosine) from ``lr_max/div`` to ``lr_max`` over ``pct_start`` of
    training, then anneals to ``lr_max/div_final``; momentum (Adam's beta1) goes the other way
    through ``moms``."""
    lr_max = _group_lrs(learn, lr_max)
    scheds = {"lr": combined_cos(pct_start, lr_max / div, lr_max, lr_max / div_final)}
    if learn.opt.supports("mom"):
        scheds["mom"] = combined_cos(pct_start, *(learn.moms if moms is None else moms))
    learn.fit(n_epoch, cbs=[ParamScheduler(scheds), *_listify(cbs)], reset_opt=reset_opt, wd=wd,
              start_epoch=start_epoch)


def fit_flat_cos(learn, n_epoch: int, lr=None, div_final: float = 1e5, pct_start: float = 0.75,
                 wd=None, cbs=None, reset_opt: bool = False, start_epoch: int = 0) -> None:
    """Flat ``lr`` for ``pct_start`` of training, then cosine annealing to ``lr/div_final``."""
    lr = _group_lrs(learn, lr)
    scheds = {"lr": combined_cos(pct_start, lr, lr, lr / div_final)}
    learn.fit(n_epoch, cbs=[ParamScheduler(scheds), *_listify(cbs)], reset_opt=reset_opt, wd=wd,
              start_epoch=start_epoch)


def fine_tune(learn, epochs: int, base_lr: float = 2e-3, freeze_epochs: int = 1, lr_mult: float = 100,
              pct_start: float = 0.3, div: float = 5.0, **kwargs) -> None:
    """fastai's fine-tuning: ``freeze()`` and 1cycle for ``freeze_epochs`` at ``slice(base_lr)``
    (pct_start 0.99); then ``unfreeze()`` and 1cycle for ``epochs`` at
    ``slice(base_lr / 2 / lr_mult, base_lr / 2)`` with ``pct_start`` and ``div``."""
    learn.freeze()
    fit_one_cycle(learn, freeze_epochs, slice(base_lr), pct_start=0.99, **kwargs)
    base_lr /= 2
    learn.unfreeze()
    # With one layer group fastai's slice gives that group the slice's stop.
    lrs = slice(base_lr / lr_mult, base_lr) if learn.opt.n_groups > 1 else base_lr
    fit_one_cycle(learn, epochs, lrs, pct_start=pct_start, div=div, **kwargs)


def _listify(cbs) -> list:
    if cbs is None:
        return []
    return list(cbs) if isinstance(cbs, (list, tuple)) else [cbs]


__all__ = ["ParamScheduler", "SchedCos", "SchedExp", "SchedLin", "SchedNo", "SchedPoly",
           "combine_scheds", "combined_cos", "fine_tune", "fit_flat_cos", "fit_one_cycle"]
