"""The Learner's logger callbacks: ``SinkCallback`` drives one sink (``mlx_train.sinks``) from
the training loop's events, and each logger is it with one sink:

- ``CSVLogger``: the epoch table (``history.csv``); ``MetricsCSVLogger``: the step rows
  ``TrainMetrics`` makes (``train_metrics.csv``);
- ``TensorBoardCallback``, ``MLflowCallback``, ``WandbCallback``: the trackers, which need
  their package and say which to install when it is missing (when the callback is created,
  before any training).

Per epoch a sink gets the recorder's row (``train_loss``, ``valid_loss``, the metrics,
``time``); per step, the rows of the attached ``TrainMetrics`` (the recipes' ``logger=default``)
or, without one, the trackers' own every ``log_every`` training batches: ``train/loss`` and
each layer group's learning rate (``train/lr``; ``train/lr_<i>`` with several groups), at
step = ``learn.train_iter`` (batches done)."""

from __future__ import annotations

from pathlib import Path

from mlx_train.callback.core import Callback
from mlx_train.sinks import CSVSink, MissingPackage, MLflowSink, TensorBoardSink, WandbSink
from mlx_train.sinks.csv_file import read_csv


def learner_hyperparams(learn) -> dict:
    """What a sink records at the start of a Learner's fit: epochs, model, loss, optimizer,
    parameter count, batch size and each layer group's hyper-parameters (``lr_0``, ...)."""
    hp = {"n_epoch": learn.n_epoch, "model": type(learn.model).__name__,
          "loss_func": type(learn.loss_func).__name__,
          "opt": type(learn.opt.opt).__name__ if learn.opt is not None else None,
          "n_params": sum(p.numel() for p in learn.model.parameters())}
    train = getattr(learn.dls, "train", None)
    bs = getattr(getattr(train, "dl", None), "batch_size", None)
    if bs is not None:
        hp["bs"] = bs
    for i, h in enumerate(learn.opt.hypers if learn.opt is not None else []):
        hp.update({f"{k}_{i}": v for k, v in h.items()})
    return hp


def batch_values(learn) -> dict[str, float]:
    """A training batch's loss and learning rates (a tracker's own step row)."""
    values = {"train/loss": float(learn.loss.detach().float().mean())}
    hypers = learn.opt.hypers
    for i, h in enumerate(hypers):
        values[f"train/lr_{i}" if len(hypers) > 1 else "train/lr"] = float(h["lr"])
    return values


class SinkCallback(Callback):
    """Drive ``sink`` from a fit: ``open`` (the learner's path, ``learner_hyperparams``) at
    ``before_fit``, the recorder's row at each ``after_epoch``, ``close`` when the fit ends
    (however it ends). Step rows come from ``TrainMetrics`` when one is attached; else, with
    ``log_every``, this callback makes its own every ``log_every`` training batches
    (``batch_values``). ``sink``: a sink, or a sink class built with ``kwargs`` (a missing
    package is then reported in this callback's name)."""

    order = 60  # after the Recorder (50) has made the epoch's row
    run_valid = False

    def __init__(self, sink, log_every: int | None = None, **kwargs):
        if log_every is not None and log_every < 1:
            raise ValueError(f"log_every must be at least 1, got {log_every}")
        if isinstance(sink, type):
            try:
                sink = sink(**kwargs)
            except MissingPackage as e:
                raise MissingPackage(type(self).__name__, e.pip_name, e.reason) from None
        self.sink, self.log_every = sink, log_every
        self.opened = self.own_steps = False

    def before_fit(self):
        learn = self.learn
        self.own_steps = self.log_every is not None and learn.cb("train_metrics") is None
        self.sink.open(Path(learn.path), learner_hyperparams(learn))
        self.opened = True

    def after_batch(self):
        learn = self.learn
        if self.own_steps and learn.yb and learn.train_iter % self.log_every == 0:
            self.log_step(learn.train_iter, learn.epoch, batch_values(learn))

    def log_step(self, step: int, epoch: int, values: dict[str, float]) -> None:
        """Send a step row (``TrainMetrics`` sends its rows here)."""
        if self.opened:
            self.sink.log_step(step, epoch, values)

    def after_epoch(self):
        recorder = self.learn.cb("recorder")
        if recorder is None or not recorder.log:
            return
        row = dict(zip(recorder.metric_names[1:], recorder.log[1:], strict=False))
        self.sink.log_epoch(self.learn.epoch, row, self.learn.train_iter)

    def after_fit(self):
        self.cleanup()

    def cleanup(self):
        if self.opened:
            self.opened = False
            self.sink.close()

    def where(self) -> list[str]:
        """Where the rows go, one line each."""
        return self.sink.where(Path(self.learn.path))


class _CSVCallback(SinkCallback):
    kind = ""  # the CSVSink file this callback writes: "steps" or "epochs"

    @property
    def filepath(self) -> Path:
        return self.sink.paths(Path(self.learn.path))[self.kind]

    def read_log(self) -> list[dict]:
        """The file's rows as dicts (strings, as written)."""
        return read_csv(self.filepath)


class CSVLogger(_CSVCallback):
    """The recorder's epoch rows to ``learn.path / fname`` (``epoch``, ``train_loss``,
    ``valid_loss``, the metrics, ``time``), flushed and fsynced each epoch, so a crash keeps the
    finished epochs. ``append=True`` keeps an existing file (its header, written once)."""

    kind = "epochs"

    def __init__(self, fname: str | Path = "history.csv", append: bool = False):
        super().__init__(CSVSink(steps=None, epochs=fname, append=append))


class MetricsCSVLogger(_CSVCallback):
    """The step rows ``TrainMetrics`` sends to ``learn.path / fname`` (``step``, ``epoch``, then
    the values without their ``train/`` prefix, as first logged). ``append=True`` continues an
    existing file (a resumed run), writing no second header."""

    kind = "steps"

    def __init__(self, fname: str | Path = "train_metrics.csv", append: bool = True):
        super().__init__(CSVSink(steps=fname, epochs=None, append=append))


class TensorBoardCallback(SinkCallback):
    """Scalars to TensorBoard event files in ``log_dir`` (relative to ``learn.path``; per epoch
    the step is the epoch), and the hyper-parameters as text (``TensorBoardSink``). Needs
    ``pip install tensorboard``."""

    def __init__(self, log_dir: str | Path = "runs", log_every: int = 1):
        super().__init__(TensorBoardSink, log_every, log_dir=log_dir)

    @property
    def writer(self):
        """The open ``SummaryWriter`` (None outside a fit)."""
        return self.sink.writer


class MLflowCallback(SinkCallback):
    """Log to MLflow: parameters at the start, then the metrics (per epoch, step = epoch).
    Starts a run (named ``run_name``, in ``experiment``; ``tracking_uri`` if given) unless one
    is active, and ends the run it started (``MLflowSink``). Needs ``pip install mlflow``."""

    def __init__(self, experiment: str | None = None, run_name: str | None = None,
                 tracking_uri: str | None = None, log_every: int = 1, params: dict | None = None):
        super().__init__(MLflowSink, log_every, experiment=experiment, run_name=run_name,
                         tracking_uri=tracking_uri, params=params)


class WandbCallback(SinkCallback):
    """Log to Weights & Biases: the config (hyper-parameters) at the start, then the metrics
    (all at step = batches done; the epoch rows also carry ``epoch``). Calls
    ``wandb.init(project=..., name=..., **init_kwargs)`` unless a run is active, and
    ``wandb.finish()`` for the run it started (``WandbSink``). Needs ``pip install wandb``
    (``mode="offline"`` in ``init_kwargs``, or ``WANDB_MODE=offline``, logs without an
    account)."""

    def __init__(self, project: str | None = None, name: str | None = None, log_every: int = 1,
                 config: dict | None = None, **init_kwargs):
        super().__init__(WandbSink, log_every, project=project, name=name, config=config,
                         **init_kwargs)


__all__ = ["CSVLogger", "MLflowCallback", "MetricsCSVLogger", "SinkCallback",
           "TensorBoardCallback", "WandbCallback", "batch_values", "learner_hyperparams"]
