"""``Recorder``: per-batch losses and learning rates, per-epoch loss and metric values."""

from __future__ import annotations

import time
from pathlib import Path

from mlx_train.callback.core import Callback
from mlx_train.metrics import AvgLoss, AvgSmoothLoss, loss_value
from mlx_train.plotting import new_figure


class Recorder(Callback):
    """Records, during training:

    - ``raw_losses``: each training batch's loss; ``losses``: its smoothed value (debiased
      exponential moving average with ``beta``, as fastai's ``recorder.losses``);
    - ``lrs``: the last layer group's learning rate at each training batch;
    - ``values``: one row per epoch, named by ``metric_names[1:]`` (``train_loss``,
      ``valid_loss``, each metric; ``time`` is logged but not stored); ``iters``: how many
      training batches had run at the end of each epoch.

    Always attached to a ``Learner`` (``learn.recorder``).
    """

    order = 50

    def __init__(self, add_time: bool = True, train_metrics: bool = False,
                 valid_metrics: bool = True, beta: float = 0.98):
        self.add_time, self.train_metrics, self.valid_metrics = add_time, train_metrics, valid_metrics
        self.loss, self.smooth_loss = AvgLoss(), AvgSmoothLoss(beta=beta)
        self.lrs, self.losses, self.raw_losses, self.values, self.iters = [], [], [], [], []
        self.smooth_loss.reset()
        self.log: list = []
        self.n_batches = 0

    # -- names and history ------------------------------------------------------------------
    @property
    def metric_names(self) -> list[str]:
        names = [m.name for m in self.learn.metrics]
        if self.train_metrics and self.valid_metrics:
            names = [f"train_{n}" for n in ["loss", *names]] + [f"valid_{n}" for n in ["loss", *names]]
        elif self.valid_metrics:
            names = ["train_loss", "valid_loss", *names]
        else:
            names = ["train_loss"]
        return ["epoch", *names] + (["time"] if self.add_time else [])

    def history(self) -> list[dict]:
        """``values`` as one dict per epoch: ``{"epoch": 0, "train_loss": ..., ...}``."""
        names = [n for n in self.metric_names[1:] if n != "time"]
        return [{"epoch": i, **dict(zip(names, row, strict=False))}
                for i, row in enumerate(self.values)]

    def state_dict(self) -> dict:
        return {"lrs": self.lrs, "losses": self.losses, "raw_losses": self.raw_losses,
                "values": self.values, "iters": self.iters,
                "smooth": [self.smooth_loss.count, self.smooth_loss.val]}

    def load_state_dict(self, state: dict) -> None:
        for key in ("lrs", "losses", "raw_losses", "values", "iters"):
            setattr(self, key, list(state.get(key, [])))
        self.smooth_loss.count, self.smooth_loss.val = state.get("smooth", [0, 0.0])

    # -- events -----------------------------------------------------------------------------
    def before_fit(self):
        if getattr(self.learn, "start_epoch", 0) == 0:  # a resumed fit keeps the history
            self.lrs, self.losses, self.raw_losses, self.values, self.iters = [], [], [], [], []
            self.smooth_loss.reset()

    def before_epoch(self):
        self.start_time = time.time()
        self.log = [self.learn.epoch]

    def before_train(self):
        self.n_batches = 0
        for m in self._train_mets[1:]:
            m.reset()

    def before_validate(self):
        self.n_batches = 0
        for m in self._valid_mets:
            m.reset()

    def after_batch(self):
        if not self.learn.yb:
            return
        self.n_batches += 1
        if not self.learn.training:
            for m in self._valid_mets:
                m.accumulate(self.learn)
            return
        loss = loss_value(self.learn.loss)  # read once: this runs every batch
        self.smooth_loss.add(loss)
        for m in self._train_mets[1:]:
            m.accumulate(self.learn)
        self.lrs.append(self.learn.opt.last_lr)
        self.raw_losses.append(loss)
        self.learn.smooth_loss = smooth = self.smooth_loss.value
        self.losses.append(smooth)

    def _values(self, metrics) -> list:
        # a phase cancelled before its first batch has nothing to report: empty columns
        return [_item(m.value) if self.n_batches else None for m in metrics]

    def after_train(self):
        self.log += self._values(self._train_mets)

    def after_validate(self):
        if self.learn.in_fit:  # validate() / get_preds() outside fit log nothing
            self.log += self._values(self._valid_mets)

    def after_epoch(self):
        if not self.log or self.log[0] != self.learn.epoch:  # cancelled before our before_epoch
            self.log = [self.learn.epoch]
        width = len(self.metric_names) - (2 if self.add_time else 1)
        self.log += [None] * (width - len(self.log) + 1)  # a cancelled epoch skips whole phases
        self.learn.final_record = self.log[1:]
        self.values.append(self.learn.final_record)
        if self.add_time:
            self.log.append(format_time(time.time() - self.start_time))
        self.learn.logger(self.log)
        self.iters.append(self.smooth_loss.count)

    @property
    def _train_mets(self):
        return [self.smooth_loss] + (list(self.learn.metrics) if self.train_metrics else [])

    @property
    def _valid_mets(self):
        if not self.valid_metrics:
            return []
        return [self.loss, *self.learn.metrics]

    def valid_values(self) -> list:
        """The validation loss and metrics of the last validation pass."""
        return [_item(m.value) for m in [self.loss, *self.learn.metrics]]

    # -- plots ------------------------------------------------------------------------------
    def plot_loss(self, fname: str | Path = "loss.png", skip_start: int = 5,
                  with_valid: bool = True) -> Path | None:
        """Write the smoothed training loss (and the validation loss per epoch) to a PNG
        (``fname`` relative to ``learn.path``).

        Returns the path, or ``None`` (with a warning) when matplotlib is not installed."""
        fig, ax = new_figure("Recorder.plot_loss")
        if fig is None:
            return None
        ax.plot(range(skip_start, len(self.losses)), self.losses[skip_start:], label="train")
        names = self.metric_names[1:]
        if with_valid and "valid_loss" in names and self.values:
            col = names.index("valid_loss")
            pts = [(it, row[col]) for it, row in zip(self.iters, self.values, strict=False)
                   if it >= skip_start and row[col] is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), label="valid", marker="o")
        ax.set_xlabel("training batches")
        ax.set_ylabel("loss")
        ax.legend()
        path = Path(fname) if Path(fname).is_absolute() else Path(self.learn.path) / fname
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        return path


def _item(v):
    try:
        return v.item()
    except AttributeError:
        return v


def format_time(t: float) -> str:
    """Seconds as the epoch table's ``time`` column: ``mm:ss``, ``h:mm:ss`` from an hour."""
    t = int(t)
    h, m, s = t // 3600, (t // 60) % 60, t % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


__all__ = ["Recorder", "format_time"]
