"""Callbacks that watch a monitored value each epoch: early stopping, best-model saving, lr on plateau."""

from __future__ import annotations

import math
import operator

import torch

from mlx_train.callback.core import Callback, CancelFitException


class TerminateOnNaNCallback(Callback):
    """Stop training as soon as a training loss is NaN or infinite."""

    order = -9
    run_valid = False

    def after_batch(self):
        if not torch.isfinite(self.learn.loss.detach()).all():
            raise CancelFitException()


class TrackerCallback(Callback):
    """Tracks ``monitor`` (a name in ``learn.recorder.metric_names``, e.g. ``valid_loss`` or
    ``accuracy``) at the end of each epoch and sets ``self.new_best``.

    ``comp`` (``operator.lt`` / ``operator.gt``) defaults to lower-is-better for names that
    contain ``loss`` or ``error`` and higher-is-better otherwise. An improvement must beat the
    best by more than ``min_delta``. A resumed fit (``start_epoch > 0``) replays the recorder's
    history, so the best value and the patience count continue where they were.
    """

    order = 60

    def __init__(self, monitor: str = "valid_loss", comp=None, min_delta: float = 0.0,
                 reset_on_fit: bool = True):
        if comp is None:
            comp = operator.lt if ("loss" in monitor or "error" in monitor) else operator.gt
        self.monitor, self.comp, self.reset_on_fit = monitor, comp, reset_on_fit
        self.min_delta = -abs(min_delta) if comp is operator.lt else abs(min_delta)
        self.best = None

    def _worst(self) -> float:
        return math.inf if self.comp is operator.lt else -math.inf

    def before_fit(self):
        recorder = self.learn.cb("recorder")
        if recorder is None:
            raise ValueError(f"{type(self).__name__} needs the learner's Recorder")
        names = [n for n in recorder.metric_names[1:] if n != "time"]
        if self.monitor not in names:
            raise ValueError(f"{type(self).__name__}: cannot monitor {self.monitor!r}; the recorder "
                             f"has {names}")
        self.idx = names.index(self.monitor)
        if self.reset_on_fit or self.best is None:
            self.best = self._worst()
        self._reset_wait()
        start = getattr(self.learn, "start_epoch", 0)
        if start:  # resuming: replay what the earlier epochs did
            for row in recorder.values[:start]:
                self._update(row[self.idx])
                self._after_update(replay=True)

    def _reset_wait(self) -> None:
        pass

    def _after_update(self, replay: bool = False) -> None:
        pass

    def _update(self, value) -> None:
        if value is None:
            self.new_best = False
            return
        self.new_best = bool(self.comp(value - self.min_delta, self.best))
        if self.new_best:
            self.best = value

    def after_epoch(self):
        self._update(self.learn.recorder.values[-1][self.idx])


class EarlyStoppingCallback(TrackerCallback):
    """Stop when ``monitor`` has not improved for ``patience`` epochs."""

    order = TrackerCallback.order + 3

    def __init__(self, monitor: str = "valid_loss", comp=None, min_delta: float = 0.0,
                 patience: int = 1, reset_on_fit: bool = True):
        super().__init__(monitor, comp, min_delta, reset_on_fit)
        self.patience = patience

    def _reset_wait(self) -> None:
        self.wait = 0

    def _after_update(self, replay: bool = False) -> None:
        self.wait = 0 if self.new_best else self.wait + 1

    def after_epoch(self):
        super().after_epoch()
        self._after_update()
        if self.wait >= self.patience:
            self.learn.log_message(f"No improvement in {self.monitor} since epoch "
                                      f"{self.learn.epoch - self.wait}: early stopping")
            raise CancelFitException()


class SaveModelCallback(TrackerCallback):
    """Save the learner whenever ``monitor`` improves (to ``fname``), or every ``every_epoch``
    epochs (to ``{fname}_{epoch}``); at the end of the fit load the best back (unless
    ``every_epoch`` or ``at_end``, which saves the final state instead).

    Files are written with ``learn.save``: one safetensors file, written atomically. With
    ``with_opt=True`` the optimizer, RNG and loop position are saved too, so a fit can be
    resumed from the file (see ``Learner.load``).
    """

    def __init__(self, monitor: str = "valid_loss", comp=None, min_delta: float = 0.0,
                 fname: str = "model", every_epoch: int | bool = False, at_end: bool = False,
                 with_opt: bool = False, reset_on_fit: bool = True):
        super().__init__(monitor, comp, min_delta, reset_on_fit)
        self.fname, self.every_epoch, self.at_end, self.with_opt = fname, int(every_epoch), at_end, with_opt
        self.last_saved_path = None
        self.saved_any = False

    def before_fit(self):
        super().before_fit()
        self.saved_any = False

    def _save(self, name: str) -> None:
        self.last_saved_path = self.learn.save(name, with_opt=self.with_opt)
        self.saved_any = True

    def after_epoch(self):
        if self.every_epoch:
            if self.learn.epoch % self.every_epoch == 0:
                self._save(f"{self.fname}_{self.learn.epoch}")
            return
        super().after_epoch()
        if self.new_best:
            self.learn.log_message(f"Better model found at epoch {self.learn.epoch} with "
                                      f"{self.monitor} value: {self.best}.")
            self._save(self.fname)

    def after_fit(self):
        if self.at_end:
            self._save(self.fname)
        elif not self.every_epoch and self.saved_any:
            self.learn.load(self.fname, with_opt=self.with_opt, resume=False)


class ReduceLROnPlateau(TrackerCallback):
    """Divide every layer group's lr by ``factor`` (not below ``min_lr``) when ``monitor`` has not
    improved for ``patience`` epochs."""

    order = TrackerCallback.order + 2

    def __init__(self, monitor: str = "valid_loss", comp=None, min_delta: float = 0.0,
                 patience: int = 1, factor: float = 10.0, min_lr: float = 0.0,
                 reset_on_fit: bool = True):
        super().__init__(monitor, comp, min_delta, reset_on_fit)
        self.patience, self.factor, self.min_lr = patience, factor, min_lr

    def _reset_wait(self) -> None:
        self.wait = 0

    def _after_update(self, replay: bool = False) -> None:
        self.wait = 0 if self.new_best else self.wait + 1
        if replay and self.wait >= self.patience:  # the lr it cut then is in the optimizer state
            self.wait = 0

    def after_epoch(self):
        super().after_epoch()
        self._after_update()
        if self.wait >= self.patience:
            old = self.learn.opt.hypers[-1]["lr"]
            self.learn.opt.set_hyper("lr", [max(h["lr"] / self.factor, self.min_lr)
                                            for h in self.learn.opt.hypers])
            self.wait = 0
            new = self.learn.opt.hypers[-1]["lr"]
            if new < old:
                self.learn.log_message(f"Epoch {self.learn.epoch}: reducing lr to {new}")


__all__ = ["EarlyStoppingCallback", "ReduceLROnPlateau", "SaveModelCallback",
           "TerminateOnNaNCallback", "TrackerCallback"]
