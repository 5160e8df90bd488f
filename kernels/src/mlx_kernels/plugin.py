"""Registers ``mlx bench kernels`` with mlx-core's CLI (called through ``mlx.plugins``; mlx-core
is installed whenever this runs, so its imports stay inside ``register``). Only mlx-core's public
plugin API is used: ``mlx_core.registry``, ``mlx_core.require_torch`` and
``mlx_core.cli.clean_errors``; nothing else in mlx_kernels imports mlx_core.

No ``from __future__ import annotations`` here: typer reads the option types of the nested
command at definition time, where ``Path`` is a local name."""


def register() -> None:
    import json
    from pathlib import Path

    import typer

    from mlx_core import registry
    from mlx_core.cli import clean_errors

    @clean_errors
    def kernels(ops: str = typer.Option("", "--ops", help="Comma-separated ops (default: all)."),
                repeats: int = typer.Option(5, "--repeats", help="Timed runs per case (best kept)."),
                quick: bool = typer.Option(False, "--quick", help="Small shapes, for a smoke run."),
                compile: bool = typer.Option(False, "--compile", help="Also time torch.compile of the plain torch version."),
                memory: bool = typer.Option(True, "--memory/--no-memory", help="Measure peak memory too."),
                json_path: Path | None = typer.Option(None, "--json", help="Also write the rows as JSON here.")):
        """Time and peak memory of each kernel against plain torch, as ratios."""
        from mlx_core import require_torch

        require_torch("mlx bench kernels")  # a JAX-only install has this command, not torch
        from mlx_kernels import bench

        rows = bench.run([o for o in ops.split(",") if o] or None, repeats=repeats, quick=quick,
                         compile=compile, memory=memory)
        bench.print_table(rows)
        if json_path is not None:
            json_path.write_text(json.dumps(rows, indent=2))

    registry.benchmarks.register("kernels", kernels, overwrite=True)
