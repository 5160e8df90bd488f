"""Experiment-tracking callbacks: TensorBoard, MLflow and Weights & Biases.

Each logs, per training batch, ``train/loss`` and every layer group's learning rate
``train/lr`` (``train/lr_<group>`` with several groups; step = ``learn.train_iter``, batches
done so far), and per epoch the recorder's row as ``epoch/train_loss``, ``epoch/valid_loss``,
``epoch/<metric>``. Each needs its package and says which to install when it is
missing (checked when the callback is created, before any training)."""

from __future__ import annotations

import importlib
from pathlib import Path

from mlx_train.callback.core import Callback


def require(module: str, pip_name: str, feature: str):
    """Import ``module`` or raise an ImportError that names the pip install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{feature} needs the {pip_name!r} package, which is not installed "
                          f"(or failed to import: {e}): pip install {pip_name}") from None


class _TrackerLogger(Callback):
    """What the three share: which values to log, and when."""

    order = 60  # after the Recorder (50) has written the epoch's row
    run_valid = False

    def __init__(self, log_every: int = 1):
        if log_every < 1:
            raise ValueError(f"log_every must be at least 1, got {log_every}")
        self.log_every = log_every

    def batch_values(self) -> dict[str, float]:
        values = {"train/loss": float(self.learn.loss.detach().float().mean())}
        hypers = self.learn.opt.hypers
        for i, h in enumerate(hypers):
            values[f"train/lr_{i}" if len(hypers) > 1 else "train/lr"] = float(h["lr"])
        return values

    def epoch_values(self) -> dict[str, float]:
        recorder = self.learn.cb("recorder")
        if recorder is None:
            return {}
        names = [n for n in recorder.metric_names[1:] if n != "time"]
        row = getattr(self.learn, "final_record", None) or []
        return {f"epoch/{n}": float(v) for n, v in zip(names, row, strict=False)
                if isinstance(v, (int, float))}

    def hyperparams(self) -> dict:
        learn = self.learn
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

    def after_batch(self):
        if self.learn.yb and self.learn.train_iter % self.log_every == 0:
            self.log_batch(self.batch_values(), self.learn.train_iter)

    def after_epoch(self):
        self.log_epoch(self.epoch_values(), self.learn.epoch)

    def log_batch(self, values: dict, step: int) -> None:
        raise NotImplementedError

    def log_epoch(self, values: dict, epoch: int) -> None:
        raise NotImplementedError

    def after_fit(self):
        self.cleanup()


class TensorBoardCallback(_TrackerLogger):
    """Scalars to TensorBoard event files in ``log_dir`` (relative to ``learn.path``; default
    ``runs``; per epoch the step is the epoch), and the hyper-parameters as text. Needs
    ``pip install tensorboard``."""

    def __init__(self, log_dir: str | Path = "runs", log_every: int = 1):
        super().__init__(log_every)
        self.log_dir = Path(log_dir)
        self._writer_cls = require("torch.utils.tensorboard", "tensorboard",
                                   "TensorBoardCallback").SummaryWriter
        self.writer = None

    @property
    def path(self) -> Path:
        return self.log_dir if self.log_dir.is_absolute() else Path(self.learn.path) / self.log_dir

    def before_fit(self):
        self.writer = self._writer_cls(log_dir=str(self.path))
        text = "\n".join(f"    {k}: {v}" for k, v in self.hyperparams().items())
        self.writer.add_text("hyperparameters", text, 0)

    def log_batch(self, values, step):
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def log_epoch(self, values, epoch):
        for k, v in values.items():
            self.writer.add_scalar(k, v, epoch)
        self.writer.flush()

    def cleanup(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MLflowCallback(_TrackerLogger):
    """Log to MLflow: parameters at the start, then the metrics (per epoch, step = epoch). Starts a run (named
    ``run_name``, in ``experiment``; ``tracking_uri`` if given) unless one is active, and ends
    the run it started. Needs ``pip install mlflow``."""

    def __init__(self, experiment: str | None = None, run_name: str | None = None,
                 tracking_uri: str | None = None, log_every: int = 1, params: dict | None = None):
        super().__init__(log_every)
        self.mlflow = require("mlflow", "mlflow", "MLflowCallback")
        self.experiment, self.run_name, self.tracking_uri = experiment, run_name, tracking_uri
        self.params = params or {}
        self.started = False

    def before_fit(self):
        mlflow = self.mlflow
        if self.tracking_uri is not None:
            mlflow.set_tracking_uri(self.tracking_uri)
        if self.experiment is not None:
            mlflow.set_experiment(self.experiment)
        self.started = mlflow.active_run() is None
        if self.started:
            mlflow.start_run(run_name=self.run_name)
        mlflow.log_params({**self.hyperparams(), **self.params})

    def log_batch(self, values, step):
        self.mlflow.log_metrics(values, step=step)

    def log_epoch(self, values, epoch):
        if values:
            self.mlflow.log_metrics(values, step=epoch)

    def cleanup(self):
        if self.started:
            self.started = False
            self.mlflow.end_run()


class WandbCallback(_TrackerLogger):
    """Log to Weights & Biases: the config (hyper-parameters) at the start, then the metrics
    (all at step = batches done; the epoch rows also carry ``epoch``). Calls
    ``wandb.init(project=..., name=..., **init_kwargs)`` unless a run is active, and
    ``wandb.finish()`` for the run it started. Needs ``pip install wandb`` (``mode="offline"``
    in ``init_kwargs`` logs without an account)."""

    def __init__(self, project: str | None = None, name: str | None = None, log_every: int = 1,
                 config: dict | None = None, **init_kwargs):
        super().__init__(log_every)
        self.wandb = require("wandb", "wandb", "WandbCallback")
        self.project, self.run_name = project, name
        self.config, self.init_kwargs = config or {}, init_kwargs
        self.started = False

    def before_fit(self):
        wandb = self.wandb
        config = {**self.hyperparams(), **self.config}
        self.started = getattr(wandb, "run", None) is None
        if self.started:
            wandb.init(project=self.project, name=self.run_name, config=config, **self.init_kwargs)
        else:
            wandb.config.update(config, allow_val_change=True)

    def log_batch(self, values, step):
        self.wandb.log(values, step=step)

    def log_epoch(self, values, epoch):
        self.wandb.log({**values, "epoch": epoch}, step=self.learn.train_iter)

    def cleanup(self):
        if self.started:
            self.started = False
            self.wandb.finish()


__all__ = ["MLflowCallback", "TensorBoardCallback", "WandbCallback", "require"]
