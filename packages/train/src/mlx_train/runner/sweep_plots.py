"""What every sweep and search leaves beside its jobs: the results table as ``sweep.csv`` and
``sweep.png``, the metric against each swept value (one panel per swept key). A search adds
Optuna's own plots (``optuna.visualization.matplotlib``): the optimization history, the
hyperparameter importances and, when trials reported per-epoch values, the intermediate values.

Plots need matplotlib (``pip install 'mlx-train[plot]'``); without it the CSV is still written.
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

SWEEP_CSV, SWEEP_PNG = "sweep.csv", "sweep.png"
FEW = 6  # up to this many distinct numbers are plotted as evenly spaced columns
OPTUNA_PLOTS = {"optuna_history.png": "plot_optimization_history",
                "optuna_importances.png": "plot_param_importances",
                "optuna_intermediate.png": "plot_intermediate_values"}


def write_csv(jobs, path: Path) -> Path:
    """One row per job: its number, swept values, status, every numeric final metric, dir."""
    keys = list(dict.fromkeys(k for job in jobs for k in job.swept))
    metrics = list(dict.fromkeys(k for job in jobs for k, v in job.metrics.items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["job", *keys, "status", *metrics, "output_dir"])
        for i, job in enumerate(jobs):
            writer.writerow([getattr(job, "number", i), *(job.swept.get(k, "") for k in keys),
                             job.status(), *(job.metrics.get(m, "") for m in metrics),
                             job.output_dir])
    return path


def _as_floats(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def plot_sweep(jobs, path: Path, metric: str) -> Path | None:
    """``metric`` against each swept key's values (jobs without the metric are left out);
    many distinct numbers on a numeric axis (logarithmic when they span a decade or more),
    other values (and a few numbers) as evenly spaced columns. ``None`` when there is nothing to plot or no matplotlib."""
    done = [j for j in jobs if isinstance(j.metrics.get(metric), (int, float))]
    keys = list(dict.fromkeys(k for job in jobs for k in job.swept))
    if not done or not keys:
        return None
    try:
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("sweep plot: matplotlib is not installed, so no plot was written "
                      "(pip install 'mlx-train[plot]')", stacklevel=2)
        return None
    fig = Figure(figsize=(4.2 * len(keys), 3.6), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys, strict=True):
        points = [(j.swept[key], float(j.metrics[metric])) for j in done if key in j.swept]
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        numbers = _as_floats(xs)
        if numbers is not None and len(set(numbers)) > FEW:
            ax.scatter(numbers, ys)
            positive = [x for x in numbers if x > 0]
            if len(positive) == len(numbers) and max(numbers) / min(numbers) >= 10:
                ax.set_xscale("log")
        else:  # labels, or a few numbers (adapter.r=4,8,16): one column each, in order
            categories = list(dict.fromkeys(xs))
            if numbers is not None:
                categories.sort(key=float)
            ax.scatter([categories.index(x) for x in xs], ys)
            ax.set_xticks(range(len(categories)), categories)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric} by swept value ({len(done)} of {len(jobs)} jobs)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def metric_to_plot(jobs, preferred: str | None = None) -> str | None:
    """The metric a sweep's plot shows: ``preferred`` when the jobs have it, else
    ``valid_loss``, else the first numeric final metric."""
    numeric = [k for job in jobs for k, v in job.metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    for name in (preferred, "valid_loss"):
        if name and name in numeric:
            return name
    return numeric[0] if numeric else None


def write_results(jobs, directory, metric: str | None = None) -> list[Path]:
    """``directory/sweep.csv`` and ``directory/sweep.png``; returns the files written."""
    directory = Path(directory).expanduser()
    written = [write_csv(jobs, directory / SWEEP_CSV)]
    metric = metric_to_plot(jobs, metric)
    if metric:
        png = plot_sweep(jobs, directory / SWEEP_PNG, metric)
        if png:
            written.append(png)
    return written


def plot_study(study, directory) -> list[Path]:
    """Optuna's matplotlib plots of ``study`` into ``directory``; a plot Optuna cannot draw
    yet (e.g. importances from fewer than two finished trials) is skipped."""
    try:
        import matplotlib
        from optuna.visualization import matplotlib as optuna_plots
    except ImportError:
        return []
    import optuna

    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    complete = [t for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
    written = []
    for name, function in OPTUNA_PLOTS.items():
        if function == "plot_param_importances" and len(complete) < 2:
            continue
        if function == "plot_intermediate_values" and not any(t.intermediate_values
                                                                for t in finished):
            continue
        # optuna sets pyplot's ggplot style globally: keep it to these figures
        with warnings.catch_warnings(), matplotlib.rc_context():
            warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
            try:
                ax = getattr(optuna_plots, function)(study)
            except (ValueError, RuntimeError):  # too few trials, a constant objective, ...
                continue
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.tight_layout()
            fig.savefig(directory / name, dpi=100)
        import matplotlib.pyplot as plt

        plt.close(fig)  # optuna draws with pyplot: free its figure
        written.append(directory / name)
    return written


__all__ = ["OPTUNA_PLOTS", "SWEEP_CSV", "SWEEP_PNG", "metric_to_plot", "plot_study",
           "plot_sweep", "write_csv", "write_results"]
