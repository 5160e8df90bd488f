"""``MLflowSink``: parameters and metrics to an MLflow run (needs ``pip install mlflow`` or
``mlflow-skinny``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlx_train.sinks.base import TrackerRun, epoch_scalars, require


class MLflowSink(TrackerRun):
    """At ``open``: the tracking URI (``tracking_uri``, else ``MLFLOW_TRACKING_URI`` / MLflow's
    default), the experiment (``experiment``, else the active / default one), a run named
    ``run_name`` unless one is active, and the hyper-parameters with ``params`` as its
    parameters. Then each step row's values at its step and each epoch row's numbers as
    ``epoch/<name>`` at step = the epoch. ``close`` ends the run it started, only that one."""

    def __init__(self, experiment: str | None = None, run_name: str | None = None,
                 tracking_uri: str | None = None, params: dict | None = None):
        self.mlflow = require("mlflow", "mlflow", type(self).__name__)
        self.experiment, self.run_name, self.tracking_uri = experiment, run_name, tracking_uri
        self.params = params or {}
        self.label = "MLflow"
        self.place = f"experiment {experiment}" if experiment else "the active / default experiment"
        self.run_id: str | None = None

    def open(self, directory, hparams: Mapping[str, Any]) -> None:
        mlflow = self.mlflow
        if self.tracking_uri is not None:
            mlflow.set_tracking_uri(self.tracking_uri)
        if self.experiment is not None:
            mlflow.set_experiment(self.experiment)
        self.started = mlflow.active_run() is None
        run = mlflow.start_run(run_name=self.run_name) if self.started else mlflow.active_run()
        self.run_id = run.info.run_id
        mlflow.log_params({**hparams, **self.params})

    def log_step(self, step: int, epoch: int, values: Mapping[str, float]) -> None:
        self.mlflow.log_metrics(dict(values), step=step)

    def log_epoch(self, epoch: int, row: Mapping[str, Any], step: int) -> None:
        if values := epoch_scalars(row):
            self.mlflow.log_metrics(values, step=epoch)

    def end_run(self) -> None:
        self.mlflow.end_run()


__all__ = ["MLflowSink"]
