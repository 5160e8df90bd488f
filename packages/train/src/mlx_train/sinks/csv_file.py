"""``CSVSink``: step rows to one CSV file (``train_metrics.csv``: ``step``, ``epoch``, the values
without their ``train/`` prefix), epoch rows to another (``history.csv``: ``epoch``, then the
row's columns); either may be None. ``CSVTable`` is one such file."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlx_train.sinks.base import resolve


class CSVTable:
    """A CSV file written a row (a dict) at a time: the header is the first row's keys, later
    rows fill those columns (a key the header lacks is left out, a missing one is empty, as is
    None). ``append=True`` continues an existing file under its own header (a resumed run)."""

    def __init__(self, path: Path, append: bool):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.columns: list[str] | None = None
        if append and path.exists() and path.stat().st_size > 0:
            with path.open(newline="") as f:
                self.columns = next(csv.reader(f), None)
        self.file = path.open("a" if append else "w", newline="")
        self.writer = csv.writer(self.file)

    def write(self, row: Mapping[str, Any]) -> None:
        if self.columns is None:
            self.columns = list(row)
            self.writer.writerow(self.columns)
        self.writer.writerow(["" if row.get(c) is None else row[c] for c in self.columns])
        self.file.flush()  # a crashed run keeps its rows

    def sync(self) -> None:
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def read_csv(path: Path) -> list[dict]:
    """A CSV file's rows as dicts (strings, as written)."""
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


class CSVSink:
    """Step rows to ``steps`` and epoch rows to ``epochs`` (file names, relative to the run's
    directory; None: not written). ``append=True`` continues existing files (a resumed run: one
    header, the rows go on). Each row is flushed; the epoch rows are fsynced, and the step rows
    with them, so a crash keeps the finished epochs."""

    def __init__(self, steps: str | Path | None = "train_metrics.csv",
                 epochs: str | Path | None = "history.csv", append: bool = True):
        self.steps = None if steps is None else Path(steps)
        self.epochs = None if epochs is None else Path(epochs)
        self.append = append
        self.tables: dict[str, CSVTable] = {}

    def paths(self, directory: Path) -> dict[str, Path]:
        """The files, by kind (``steps``, ``epochs``), under ``directory``."""
        return {kind: resolve(name, directory) for kind, name in
                (("steps", self.steps), ("epochs", self.epochs)) if name is not None}

    def open(self, directory, hparams=None) -> None:
        self.close()
        self.tables = {kind: CSVTable(path, self.append)
                       for kind, path in self.paths(directory).items()}

    def log_step(self, step: int, epoch: int, values: Mapping[str, float]) -> None:
        if (table := self.tables.get("steps")) is not None:
            table.write({"step": step, "epoch": epoch,
                         **{k.removeprefix("train/"): v for k, v in values.items()}})

    def log_epoch(self, epoch: int, row: Mapping[str, Any], step: int) -> None:
        if (table := self.tables.get("epochs")) is not None:
            table.write({"epoch": epoch, **row})
        for table in self.tables.values():
            table.sync()

    def close(self) -> None:
        for table in self.tables.values():
            table.close()
        self.tables = {}

    def where(self, directory: Path) -> list[str]:
        label = {"steps": "step metrics", "epochs": "epoch table"}
        return [f"{label[kind]}: {path}" for kind, path in self.paths(directory).items()]


__all__ = ["CSVSink", "CSVTable", "read_csv"]
