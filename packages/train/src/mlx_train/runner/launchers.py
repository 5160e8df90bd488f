"""Sweep jobs through Hydra's own launcher plugins: ``mlx train RECIPE -m ...
hydra/launcher=submitit_slurm hydra.launcher.partition=gpu``.

``hydra/launcher=`` picks a launcher exactly as in a Hydra application: ``submitit_slurm`` and
``submitit_local`` (``pip install hydra-submitit-launcher``), ``joblib``
(``pip install hydra-joblib-launcher``), or any other installed plugin; ``hydra.launcher.KEY``
sets its options (the plugin's own config: ``timeout_min``, ``partition``, ``n_jobs``, ...).

Hydra runs launchers only from its ``Sweeper``, inside a ``@hydra.main`` application, while
``mlx train`` composes with Hydra's compose API (to check every job before any runs). So this
module does what Hydra's ``Hydra.multirun`` does around a launcher and nothing more: it loads
the master config with Hydra's ``ConfigLoader`` (the launcher group and options, the search
path), has ``Plugins.instantiate_launcher`` build and set up the plugin's launcher class, and
calls its ``launch`` with the jobs' overrides. The plugin then does everything as for a Hydra
app: it composes each job's config (``load_sweep_config``) where the job runs (a Slurm node, a
submitit or joblib worker process), runs it through ``hydra.core.utils.run_job`` (which writes
``.hydra/`` and the job's log into the job's directory) and returns Hydra's ``JobReturn``.
The task function is ``RecipeTask``: validate the job's config, run the recipe.

Each job's directory is ``hydra.sweep.dir/hydra.sweep.subdir``, set here to the sweep's
``output_dir`` and the job's own directory in it (its number), so jobs land where ``-m`` puts
them without a launcher; the submitit plugin keeps its files in ``output_dir/.submitit``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mlx_train.runner.config import RecipeConfigError, quote


def split(overrides) -> tuple[list[str], list[str]]:
    """``(launcher_overrides, others)``: ``hydra/launcher=...`` and ``hydra.launcher.*``
    overrides, and the rest."""
    launcher, others = [], []
    for o in overrides or []:
        key = str(o).lstrip("+~").split("=", 1)[0].strip()
        is_launcher = key == "hydra/launcher" or key.startswith("hydra.launcher.")
        (launcher if is_launcher else others).append(str(o))
    if launcher and not any(o.lstrip("+").startswith("hydra/launcher") for o in launcher):
        raise RecipeConfigError(f"{launcher[0]}: set hydra.launcher.* options only with a "
                                "launcher, e.g. hydra/launcher=submitit_local")
    return launcher, others


@dataclass(frozen=True)
class RecipeTask:
    """Hydra's task function for one sweep job: its config (Hydra's node removed by
    ``run_job``) is validated and the recipe runs; the return value is its final metrics."""

    recipe: object

    def __call__(self, cfg) -> dict:
        from mlx_train.runner.config import validate

        validate(cfg, self.recipe)
        return self.recipe(cfg)


def _job_overrides(job, sweep_dir: Path) -> list[str]:
    """The job's overrides with its ``output_dir`` absolute (a job may run in another process
    or on another machine, in another directory) and Hydra's job directory set to it."""
    keep = [o for o in job.overrides if o.split("=", 1)[0].lstrip("+") != "output_dir"]
    path = Path(job.output_dir).expanduser().resolve()
    subdir = os.path.relpath(path, sweep_dir)
    return [*keep, f"output_dir={quote(path)}", f"hydra.sweep.subdir={quote(subdir)}"]


def launch_jobs(recipe, jobs, launcher_overrides: list[str], sweep_dir: str,
                config_dir=None) -> None:
    """Run the sweep's ``jobs`` (``multirun.Job``, planned and checked) through the launcher
    plugin the overrides select, with Hydra's sweep directory ``sweep_dir`` (the one above the
    jobs'); fills each job's ``metrics`` or ``error``."""
    from hydra._internal.callbacks import Callbacks
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.plugins import Plugins
    from hydra.core.utils import JobStatus
    from hydra.errors import HydraException
    from hydra.types import HydraContext, RunMode
    from omegaconf.errors import OmegaConfBaseException

    from mlx_train.recipes.base import say
    from mlx_train.runner.config import _hydra, _search_path

    sweep_dir = Path(sweep_dir).expanduser().resolve()
    job_overrides = [_job_overrides(job, sweep_dir) for job in jobs]
    master_overrides = [*launcher_overrides, f"hydra.sweep.dir={quote(sweep_dir)}",
                        "hydra.job.chdir=false"]
    extra = _search_path(recipe.config_module, config_dir)
    if extra:
        master_overrides.append(f"hydra.searchpath=[{','.join(extra)}]")
    with _hydra(recipe.config_module, config_dir):
        loader = GlobalHydra.instance().config_loader()
        try:
            master = loader.load_configuration(recipe.config_name, master_overrides,
                                               run_mode=RunMode.MULTIRUN, from_shell=False)
            launcher = Plugins.instance().instantiate_launcher(
                hydra_context=HydraContext(config_loader=loader, callbacks=Callbacks(master)),
                task_function=RecipeTask(recipe), config=master)
        except (HydraException, OmegaConfBaseException, ImportError) as e:
            raise RecipeConfigError(f"{' '.join(launcher_overrides)}: {_first_lines(e)} (is "
                                    "the launcher's plugin installed? pip install "
                                    "hydra-submitit-launcher or hydra-joblib-launcher)") from None
        choice = master.hydra.runtime.choices.get("hydra/launcher")
        say(f"launching {len(jobs)} job(s) with Hydra's {choice} launcher "
            f"({type(launcher).__module__}.{type(launcher).__name__})")
        returns = launcher.launch(job_overrides, initial_job_idx=0)
    for job, ret in zip(jobs, returns, strict=True):
        if ret.status is JobStatus.COMPLETED:
            job.metrics = dict(ret.return_value or {})
        else:
            error = ret._return_value  # the job's exception (return_value would raise it)
            job.error = f"{type(error).__name__}: {error}"


def _first_lines(e: Exception) -> str:
    return str(e).split("\nConfig search path:")[0].strip()


__all__ = ["RecipeTask", "launch_jobs", "split"]
