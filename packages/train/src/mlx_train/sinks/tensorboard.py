"""``TensorBoardSink``: scalars to TensorBoard event files (needs ``pip install tensorboard``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlx_train.sinks.base import epoch_scalars, require, resolve


class TensorBoardSink:
    """Event files in ``log_dir`` (relative to the run's directory): the hyper-parameters as text
    (``hyperparameters``), each step row's values at its step, each epoch row's numbers as
    ``epoch/<name>`` at step = the epoch (then flushed)."""

    def __init__(self, log_dir: str | Path = "runs"):
        self.log_dir = Path(log_dir)
        self.writer_cls = require("torch.utils.tensorboard", "tensorboard",
                                  type(self).__name__).SummaryWriter
        self.writer = None

    def open(self, directory, hparams: Mapping[str, Any]) -> None:
        self.close()
        self.writer = self.writer_cls(log_dir=str(resolve(self.log_dir, directory)))
        if hparams:
            text = "\n".join(f"    {k}: {v}" for k, v in hparams.items())
            self.writer.add_text("hyperparameters", text, 0)

    def log_step(self, step: int, epoch: int, values: Mapping[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def log_epoch(self, epoch: int, row: Mapping[str, Any], step: int) -> None:
        for k, v in epoch_scalars(row).items():
            self.writer.add_scalar(k, v, epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def where(self, directory: Path) -> list[str]:
        return [f"TensorBoard: tensorboard --logdir {resolve(self.log_dir, directory)}"]


__all__ = ["TensorBoardSink"]
