"""``mlx``: one root command; each installed package adds its groups through ``mlx.plugins``."""

from __future__ import annotations

import sys

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


# the subcommands that train (and the benchmarks of training): where the allocator setting was
# measured to matter (mlx_core.memory); the others start once, as they are
TRAINING_COMMANDS = frozenset({"quickstart", "train", "tune", "adapters", "recipes"})
TRAINING_BENCHMARKS = frozenset({"lora", "learner", "sweep"})


def trains(argv: list[str]) -> bool:
    """Whether the ``mlx`` command line ``argv`` (without the program) runs a training command."""
    words = [a for a in argv if not a.startswith("-")]
    if not words:
        return False
    return words[0] in TRAINING_COMMANDS or (
        words[0] == "bench" and len(words) > 1 and words[1] in TRAINING_BENCHMARKS)


def main() -> None:
    from mlx_core.memory import relaunch_with_tuned_allocator, tune_allocator

    if trains(sys.argv[1:]):
        relaunch_with_tuned_allocator()  # training's freed activations must be reusable
        tune_allocator()
    build_app()(prog_name="mlx")
