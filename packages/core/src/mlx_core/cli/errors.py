"""Known errors become one clean ``Error: ...`` line and exit code 1, not a traceback."""

from __future__ import annotations

import functools

import typer
from rich.console import Console
from rich.markup import escape

from mlx_core.registry import UnknownNameError

KNOWN_ERRORS = (UnknownNameError, FileNotFoundError, FileExistsError, ValueError, ImportError,
                RuntimeError)
stderr = Console(stderr=True)


def clean_errors(command):
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KNOWN_ERRORS as e:
            # escape: messages hold brackets, e.g. 'mlx-core[torch]', that rich would eat as markup
            stderr.print(f"[bold red]Error:[/bold red] {escape(str(e))}", highlight=False,
                         soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper
