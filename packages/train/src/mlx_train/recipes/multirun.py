"""Sweeps: ``mlx train RECIPE -m optimizer.lr=1e-4,3e-4 optimizer=adamw,sgd``.

Overrides are parsed with Hydra's own override grammar (``OverridesParser``): comma lists,
``choice(...)``, ``range(...)``; the jobs are their cartesian product, as Hydra's basic sweeper
makes them. They run one after another, each in ``output_dir/<job number>``: in this process,
or with ``--nproc N`` each on N processes through ``launch`` (torchrun). Every job's config is
composed and validated before the first one starts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from rich.markup import escape
from rich.table import Table

from mlx_train.recipes.config import RecipeConfigError, quote

METRIC_COLUMNS = ("train_loss", "valid_loss", "perplexity", "exact_match", "base_exact_match",
                  "time_s")


@dataclass
class Job:
    overrides: list[str]
    swept: dict[str, str]
    output_dir: str = ""
    metrics: dict = field(default_factory=dict)
    error: str = ""


def expand(overrides) -> tuple[list[dict[str, str]], list[str]]:
    """``(jobs, fixed)``: one ``{key: value}`` dict of swept overrides per job (cartesian
    product, in the order given), and the overrides every job shares."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides or []])
    except HydraException as e:
        raise RecipeConfigError(str(e)) from None
    axes, fixed = [], []
    for o in parsed:
        if not o.is_sweep_override():
            fixed.append(o.input_line)
            continue
        if o.value_type is ValueType.GLOB_CHOICE_SWEEP:
            raise RecipeConfigError(f"{o.input_line}: glob() sweeps are not supported; list the "
                                    "options with commas")
        key = o.get_key_element()
        axes.append([(key, v) for v in o.sweep_string_iterator()])
    jobs = [dict(combo) for combo in itertools.product(*axes)]
    return jobs, fixed


def plan(recipe, overrides, config_dir=None) -> list[Job]:
    """The jobs of a sweep, each composed and validated (nothing runs yet)."""
    from mlx_train.recipes.config import compose_config

    swept, fixed = expand(overrides)
    base = compose_config(recipe, fixed, config_dir, check=False).output_dir
    jobs = []
    for i, values in enumerate(swept):
        job_overrides = [*fixed, *(f"{k}={v}" for k, v in values.items())]
        if not any(k.lstrip("+") == "output_dir" for k in values):
            job_overrides.append(f"output_dir={quote(f'{base}/{i}')}")
        try:
            cfg = compose_config(recipe, job_overrides, config_dir)
        except RecipeConfigError as e:
            shown = " ".join(f"{k}={v}" for k, v in values.items())
            raise RecipeConfigError(f"sweep job {i} ({shown}): {e}") from None
        jobs.append(Job(job_overrides, values, str(cfg.output_dir)))
    return jobs


def run_sweep(recipe, overrides, config_dir=None, nproc: int = 1) -> list[Job]:
    """Run every job of the sweep (a failing job is recorded and the next one runs); with
    ``nproc > 1``, each job on ``nproc`` processes (``mlx_train.recipes.launch``)."""
    from mlx_train.recipes.base import say
    from mlx_train.recipes.config import compose_config
    from mlx_train.recipes.launch import launch

    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    jobs = plan(recipe, overrides, config_dir)
    on = f" on {nproc} processes each" if nproc > 1 else ""
    say(f"sweep: {len(jobs)} job(s) of {recipe.name}{on}")
    for i, job in enumerate(jobs):
        shown = " ".join(f"{k}={v}" for k, v in job.swept.items())
        say(f"[bold]job {i}[/bold]: {shown}")
        try:
            if nproc > 1:
                job.metrics = launch(recipe.name, job.overrides, config_dir, nproc)
            else:
                job.metrics = recipe(compose_config(recipe, job.overrides, config_dir))
        except Exception as e:  # noqa: BLE001 - one failed job must not lose the others' results
            job.error = f"{type(e).__name__}: {e}"
            say(f"[red]job {i} failed[/red]: {job.error}")
    return jobs


def table(jobs: list[Job], title: str = "sweep") -> Table:
    """A rich table: one row per job, its swept overrides and final metrics."""
    keys = list(dict.fromkeys(k for job in jobs for k in job.swept))
    metrics = [m for m in METRIC_COLUMNS if any(m in job.metrics for job in jobs)]
    t = Table(title=title)
    for column in ["#", *keys, *metrics, "status", "output_dir"]:
        t.add_column(column)
    for i, job in enumerate(jobs):
        status = f"[red]failed: {escape(job.error)}[/red]" if job.error else "ok"
        t.add_row(str(i), *(job.swept.get(k, "") for k in keys),
                  *(_fmt(job.metrics.get(m)) for m in metrics), status, job.output_dir)
    return t


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


__all__ = ["Job", "expand", "plan", "run_sweep", "table"]
