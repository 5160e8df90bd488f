"""``ProgressCallback``: rich progress bars (epochs, batches with the live loss) and the epoch
table (``mlx_train.sinks.ConsoleSink``, the table a loop without a Learner prints too)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mlx_train.callback.core import Callback
from mlx_train.sinks.console import ConsoleSink


def no_log(row) -> None:
    """The learner's logger inside ``Learner.no_logging()``: drops every row."""


class ProgressCallback(Callback):
    """Shows an epoch bar and a batch bar (with the smoothed training loss) while fitting, and
    prints the recorder's row at the end of each epoch as a table.

    Bars are off inside ``learn.no_bar()`` (or when the learner is built with ``progress=False``);
    rows are off inside ``learn.no_logging()``. Bars are transient (only the table remains) and
    drawn only on a terminal.
    """

    order = 140

    def __init__(self, console: Console | None = None):
        self.console = console
        self.progress = None

    def before_fit(self):
        console = self.console or Console()
        self.table = ConsoleSink(console)
        self.table.open()
        self.batch_task = None
        if self.learn.show_bar and console.is_terminal:  # bars are useless in logs and pipes
            self.progress = Progress(
                TextColumn("{task.description:>5}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                console=console, transient=True)
            self.progress.start()
            start = getattr(self.learn, "start_epoch", 0)
            self.epoch_task = self.progress.add_task("epoch", total=self.learn.n_epoch,
                                                     completed=start, info="")
        if self.learn.logger is not no_log:
            self._old_logger, self.learn.logger = self.learn.logger, self.table.write
            self.table.header(self.learn.recorder.metric_names if self._has_recorder() else [])

    def _has_recorder(self) -> bool:
        return any(type(cb).__name__ == "Recorder" for cb in self.learn.cbs)

    def _start_batches(self, name: str):
        if self.progress is None:
            return
        try:
            total = len(self.learn.dl)
        except TypeError:
            total = None
        if self.batch_task is None:
            self.batch_task = self.progress.add_task(name, total=total, info="")
        else:
            self.progress.reset(self.batch_task, total=total, description=name, info="")

    def before_train(self):
        self._start_batches("train")

    def before_validate(self):
        self._start_batches("valid")

    def after_batch(self):
        if self.progress is None or self.batch_task is None:
            return
        info = ""
        if self.learn.training and getattr(self.learn, "smooth_loss", None) is not None:
            info = f"loss {self.learn.smooth_loss:.4f}"
        self.progress.update(self.batch_task, advance=1, info=info)

    def after_epoch(self):
        if self.progress is not None:
            self.progress.update(self.epoch_task, advance=1)

    def after_fit(self):
        self.cleanup()

    def cleanup(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if hasattr(self, "_old_logger"):
            self.learn.logger = self._old_logger
            del self._old_logger


__all__ = ["ProgressCallback", "no_log"]
