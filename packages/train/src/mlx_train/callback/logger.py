"""``CSVLogger``: the recorder's epoch rows, appended to a CSV file as they come."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from mlx_train.callback.core import Callback


class CSVLogger(Callback):
    """Write ``learn.recorder``'s header and one row per epoch to ``learn.path / fname``
    (flushed and fsynced each epoch, so a crash keeps the finished epochs). ``append=True``
    keeps an existing file (writing the header only if the file is new)."""

    order = 60

    def __init__(self, fname: str | Path = "history.csv", append: bool = False):
        self.fname, self.append = Path(fname), append
        self.file = None

    @property
    def filepath(self) -> Path:
        return self.fname if self.fname.is_absolute() else Path(self.learn.path) / self.fname

    def before_fit(self):
        path = self.filepath
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not (self.append and path.exists() and path.stat().st_size > 0)
        self.file = path.open("a" if self.append else "w", newline="")
        self.writer = csv.writer(self.file)
        if fresh:
            self._write(self.learn.recorder.metric_names)

    def _write(self, row) -> None:
        self.writer.writerow(["" if v is None else v for v in row])
        self.file.flush()
        os.fsync(self.file.fileno())

    def after_epoch(self):
        self._write(self.learn.recorder.log)

    def after_fit(self):
        self.cleanup()

    def cleanup(self):
        if self.file is not None:
            self.file.close()
            self.file = None

    def read_log(self) -> list[dict]:
        """The file's rows as dicts (strings, as written)."""
        with self.filepath.open(newline="") as f:
            return list(csv.DictReader(f))


__all__ = ["CSVLogger"]
