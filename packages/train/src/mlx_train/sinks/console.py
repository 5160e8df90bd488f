"""``ConsoleSink``: the epoch rows as a table on a rich console (the Learner's table, printed
by ``ProgressCallback``, and the JAX loop's)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console


def format_row(row, widths: list[int]) -> str:
    """Cells left-aligned to ``widths`` (floats with 6 decimals), two spaces apart."""
    cells = []
    for v, w in zip(row, widths, strict=False):
        text = f"{v:.6f}" if isinstance(v, float) else str(v)
        cells.append(text.ljust(w))
    return "  ".join(cells).rstrip()


class ConsoleSink:
    """A header line (the column names, ``epoch`` first; each column at least 9 wide) before
    the first epoch row, then one line a row. ``steps=True`` also prints each step row
    (``step 10  epoch 0  loss 2.312450  lr 0.001000 ...``). ``console``: rich's (stdout) by
    default, taken at ``open``."""

    def __init__(self, console: Console | None = None, steps: bool = False):
        self.console, self.steps = console, steps
        self.out: Console | None = None
        self.widths: list[int] | None = None

    def open(self, directory=None, hparams=None) -> None:
        self.out = self.console or Console()
        self.widths = None

    def header(self, names: list[str]) -> None:
        """Print the column names (``epoch`` first) and fix the columns' widths."""
        self.widths = [max(len(n), 9) for n in names]
        if names:
            self.out.print(format_row(names, self.widths), highlight=False)

    def write(self, cells: list) -> None:
        """Print one row of cells (``epoch`` first) under the header."""
        widths = self.widths or []
        widths = widths + [9] * (len(cells) - len(widths))
        self.out.print(format_row(cells, widths), highlight=False)

    def log_step(self, step: int, epoch: int, values: Mapping[str, float]) -> None:
        if self.steps:
            cells = [f"step {step}", f"epoch {epoch}"] + [
                f"{k.removeprefix('train/')} {v:.6f}" for k, v in values.items()]
            self.out.print("  ".join(cells), highlight=False)

    def log_epoch(self, epoch: int, row: Mapping[str, Any], step: int) -> None:
        if self.widths is None:
            self.header(["epoch", *row])
        self.write([epoch, *row.values()])

    def close(self) -> None:
        self.widths = None

    def where(self, directory: Path) -> list[str]:
        return []


__all__ = ["ConsoleSink", "format_row"]
