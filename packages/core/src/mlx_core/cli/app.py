"""``mlx``: one root command; each installed package adds its groups through ``mlx.plugins``."""

from __future__ import annotations

import typer

from mlx_core import __version__, registry
from mlx_core.plugins import load_plugins


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mlx {__version__}")
        raise typer.Exit()


def build_app() -> typer.Typer:
    load_plugins()
    app = typer.Typer(name="mlx", no_args_is_help=True, add_completion=False,
                      help="Train, tune and serve language models.")

    @app.callback()
    def root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")):
        """Train, tune and serve language models."""

    for name, item in registry.cli_commands.items():
        if isinstance(item, typer.Typer):
            app.add_typer(item, name=name)
        else:
            app.command(name)(item)
    if len(registry.benchmarks):
        bench = typer.Typer(help="Benchmarks of the installed packages against their baselines.",
                            no_args_is_help=True)
        for name, command in registry.benchmarks.items():
            bench.command(name)(command)
        app.add_typer(bench, name="bench")
    return app


def main() -> None:
    from mlx_core.memory import relaunch_with_tuned_allocator, tune_allocator

    relaunch_with_tuned_allocator()  # training's freed activations must be reusable (see memory)
    tune_allocator()
    build_app()(prog_name="mlx")
