"""The ``Sink`` protocol, ``Sinks`` (several as one) and what the sinks share.

The rows, whoever makes them:

- a step row: ``step`` (training batches done, ``learn.train_iter``), ``epoch``, and
  ``values``: floats keyed ``train/<name>`` (``train/loss``, ``train/lr``, ...);
- an epoch row: ``epoch``, the row (column name -> value, in the table's order: ``train_loss``,
  ``valid_loss``, the metrics, ``time`` as ``mm:ss``; None for a phase that did not run) and
  ``step``, the training batches done at the epoch's end.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Sink(Protocol):
    """Where a run's rows go. ``open`` before the first row (``directory``: where relative paths
    resolve, the run's; ``hparams``: the run's hyper-parameters), ``close`` at the end (safe to
    call twice, and without ``open``). ``where`` says, one line each, where the rows go."""

    def open(self, directory: Path, hparams: Mapping[str, Any]) -> None: ...

    def log_step(self, step: int, epoch: int, values: Mapping[str, float]) -> None: ...

    def log_epoch(self, epoch: int, row: Mapping[str, Any], step: int) -> None: ...

    def close(self) -> None: ...

    def where(self, directory: Path) -> list[str]: ...


class Sinks:
    """Several sinks as one (a training loop without a Learner drives its sinks through it):
    each call goes to every sink, in order; ``close`` closes them all, even when one fails."""

    def __init__(self, sinks=()):
        self.sinks: list[Sink] = list(sinks)

    def open(self, directory: Path, hparams: Mapping[str, Any]) -> None:
        for sink in self.sinks:
            sink.open(Path(directory), hparams)

    def log_step(self, step: int, epoch: int, values: Mapping[str, float]) -> None:
        for sink in self.sinks:
            sink.log_step(step, epoch, values)

    def log_epoch(self, epoch: int, row: Mapping[str, Any], step: int) -> None:
        for sink in self.sinks:
            sink.log_epoch(epoch, row, step)

    def close(self) -> None:
        failed = None
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:  # noqa: BLE001 - close the others, then raise the first
                failed = failed or e
        if failed is not None:
            raise failed

    def where(self, directory: Path) -> list[str]:
        return [line for sink in self.sinks for line in sink.where(Path(directory))]


class TrackerRun(abc.ABC):
    """What the MLflow and W&B sinks share: a run they started at ``open`` (``started``) is
    theirs to end at ``close`` (``end_run``); one that was already active is left open.
    ``where``: the tracker's ``label`` and ``place`` (its experiment or project)."""

    started = False
    label = place = ""

    def where(self, directory: Path) -> list[str]:
        return [f"{self.label}: {self.place}"]

    @abc.abstractmethod
    def end_run(self) -> None:
        """End the tracker's run (the sink started it)."""

    def close(self) -> None:
        if self.started:
            self.started = False
            self.end_run()


def epoch_scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """An epoch row as the trackers log it: ``epoch/<name>`` for each number (not ``time``, not
    the columns of a phase that did not run)."""
    return {f"epoch/{k}": float(v) for k, v in row.items()
            if k != "time" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class MissingPackage(ImportError):
    """``feature`` needs ``pip_name``, which is not installed (or failed to import)."""

    def __init__(self, feature: str, pip_name: str, reason: str):
        super().__init__(f"{feature} needs the {pip_name!r} package, which is not installed "
                         f"(or failed to import: {reason}): pip install {pip_name}")
        self.feature, self.pip_name, self.reason = feature, pip_name, reason


def require(module: str, pip_name: str, feature: str):
    """Import ``module`` or raise ``MissingPackage``, which names the pip install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingPackage(feature, pip_name, str(e)) from None


def resolve(path: Path, directory: Path) -> Path:
    """``path`` itself when absolute, else under ``directory``."""
    return path if path.is_absolute() else Path(directory) / path


__all__ = ["MissingPackage", "Sink", "Sinks", "TrackerRun", "epoch_scalars", "require", "resolve"]
