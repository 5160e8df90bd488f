"""Sweeps: ``mlx train RECIPE -m optimizer.lr=1e-4,3e-4 optimizer=adamw,sgd``.

Overrides are parsed with Hydra's own override grammar (``OverridesParser``): comma lists,
``choice(...)``, ``range(...)``; the jobs are their cartesian product, as Hydra's basic sweeper
makes them. Each runs in ``output_dir/<job number>``: one after another in this process, or
with ``--nproc N`` each on N processes through ``launch`` (torchrun); with ``--jobs N``, N at a
time in worker processes of this machine (``mlx_train.runner.parallel``); with
``hydra/launcher=...``, through that Hydra launcher plugin (Slurm through submitit, joblib, ...;
``mlx_train.runner.launchers``). Every job's config is composed and validated before the first
one starts. Afterwards ``output_dir`` holds ``sweep.csv`` (the table) and ``sweep.png`` (the
metric against each swept value; ``mlx_train.runner.sweep_plots``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from rich.markup import escape
from rich.table import Table

from mlx_train.runner.config import RecipeConfigError, quote

METRIC_COLUMNS = ("train_loss", "valid_loss", "perplexity", "exact_match", "base_exact_match",
                  "time_s")


@dataclass
class Job:
    overrides: list[str]
    swept: dict[str, str]
    output_dir: str = ""
    metrics: dict = field(default_factory=dict)
    error: str = ""
    state: str = ""  # besides ok / failed, e.g. an Optuna trial's "pruned at epoch 1"
    number: int | None = None  # an Optuna trial's number (several workers share a study)

    def status(self) -> str:
        if self.error:
            return f"failed: {self.error}"
        return self.state or "ok"


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
    from mlx_train.runner.config import compose_config

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


def run_sweep(recipe, overrides, config_dir=None, nproc: int = 1, jobs: int = 1) -> list[Job]:
    """Run every job of the sweep (a failing job is recorded and the others run): with
    ``nproc > 1`` each job on ``nproc`` processes (``mlx_train.runner.launch``); with
    ``jobs > 1``, that many at a time; with ``hydra/launcher=...`` among the overrides, through
    that Hydra launcher. Writes ``sweep.csv`` and ``sweep.png`` into the sweep's output_dir."""
    from mlx_train.recipes.base import say
    from mlx_train.runner import launchers
    from mlx_train.runner.config import compose_config
    from mlx_train.runner.launch import launch
    from mlx_train.runner.sweep_plots import write_results

    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    launcher, overrides = launchers.split(overrides)
    if launcher and (jobs > 1 or nproc > 1):
        raise ValueError(f"{launcher[0]} runs the jobs where its launcher puts them: drop "
                         "--jobs/--nproc and set the launcher's options (e.g. "
                         "hydra.launcher.n_jobs for joblib, hydra.launcher.cpus_per_task)")
    if jobs > 1 and nproc > 1:
        raise ValueError("--jobs N runs N one-process jobs at a time; --nproc runs each job on "
                         "several processes: choose one")
    planned = plan(recipe, overrides, config_dir)
    on = f" on {nproc} processes each" if nproc > 1 else ""
    say(f"sweep: {len(planned)} job(s) of {recipe.name}{on}")
    if launcher:
        launchers.launch_jobs(recipe, planned, launcher, sweep_dir(planned), config_dir)
    elif jobs > 1:
        from mlx_train.runner.parallel import run_parallel

        run_parallel(recipe, planned, config_dir, jobs)
    else:
        for i, job in enumerate(planned):
            shown = " ".join(f"{k}={v}" for k, v in job.swept.items())
            say(f"[bold]job {i}[/bold]: {escape(shown)}")
            try:
                if nproc > 1:
                    job.metrics = launch(recipe.name, job.overrides, config_dir, nproc)
                else:
                    job.metrics = recipe(compose_config(recipe, job.overrides, config_dir))
            except Exception as e:  # noqa: BLE001 - one failed job must not lose the others' results
                job.error = f"{type(e).__name__}: {e}"
                say(f"[red]job {i} failed[/red]: {escape(job.error)}")
    if planned:
        for path in write_results(planned, sweep_dir(planned)):
            say(f"wrote {escape(str(path))}")
    return planned


def sweep_dir(jobs: list[Job]) -> str:
    """Where a sweep's own files go: the directory above its jobs' (``output_dir``)."""
    import os

    parents = {os.path.dirname(j.output_dir.rstrip("/")) or "." for j in jobs}
    return parents.pop() if len(parents) == 1 else os.path.commonpath(sorted(parents)) or "."


def table(jobs: list[Job], title: str = "sweep") -> Table:
    """A rich table: one row per job, its swept overrides and final metrics."""
    keys = list(dict.fromkeys(k for job in jobs for k in job.swept))
    metrics = [m for m in METRIC_COLUMNS if any(m in job.metrics for job in jobs)]
    # eval=lm_eval: the harness's scores, named lm_eval/<task>/<metric> (mlx_train.lm_eval)
    metrics += sorted({k for job in jobs for k in job.metrics if k.startswith("lm_eval")})
    t = Table(title=title)
    for column in ["#", *keys, *metrics, "status", "output_dir"]:
        t.add_column(column)
    for i, job in enumerate(jobs):
        status = f"[red]{escape(job.status())}[/red]" if job.error else escape(job.status())
        number = str(job.number) if job.number is not None else str(i)
        t.add_row(number, *(job.swept.get(k, "") for k in keys),
                  *(_fmt(job.metrics.get(m)) for m in metrics), status, job.output_dir)
    return t


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


__all__ = ["Job", "expand", "plan", "run_sweep", "sweep_dir", "table"]
