"""``WandbSink``: config and metrics to a Weights & Biases run (needs ``pip install wandb``;
``WANDB_MODE=offline`` or ``mode="offline"`` logs without an account)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlx_train.sinks.base import TrackerRun, epoch_scalars, require


class WandbSink(TrackerRun):
    """At ``open``: ``wandb.init(project=..., name=..., config=hparams + config,
    **init_kwargs)`` unless a run is active (then its config is updated). Every row is logged at
    step = training batches done: the step rows' values, the epoch rows' numbers as
    ``epoch/<name>`` with ``epoch``. ``close`` finishes the run it started, only that one."""

    def __init__(self, project: str | None = None, name: str | None = None,
                 config: dict | None = None, **init_kwargs):
        self.wandb = require("wandb", "wandb", type(self).__name__)
        self.project, self.run_name = project, name
        self.config, self.init_kwargs = config or {}, init_kwargs
        self.label = "Weights & Biases"
        self.place = f"project {project}" if project else "the default project"

    def open(self, directory, hparams: Mapping[str, Any]) -> None:
        wandb = self.wandb
        config = {**hparams, **self.config}
        self.started = getattr(wandb, "run", None) is None
        if self.started:
            wandb.init(project=self.project, name=self.run_name, config=config, **self.init_kwargs)
        else:
            wandb.config.update(config, allow_val_change=True)

    def log_step(self, step: int, epoch: int, values: Mapping[str, float]) -> None:
        self.wandb.log(dict(values), step=step)

    def log_epoch(self, epoch: int, row: Mapping[str, Any], step: int) -> None:
        self.wandb.log({**epoch_scalars(row), "epoch": epoch}, step=step)

    def end_run(self) -> None:
        self.wandb.finish()


__all__ = ["WandbSink"]
