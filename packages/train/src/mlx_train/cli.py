"""``mlx recipes list|show|copy``, ``mlx train RECIPE [key=value ...]``,
``mlx tune lora|qlora|full|dpo|distill|search`` and ``mlx quickstart``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mlx_core.cli import clean_errors

console = Console()

recipes_app = typer.Typer(help="torchtune-style recipes: list them, show a composed config, copy "
                               "one to edit.", no_args_is_help=True)
tune_app = typer.Typer(help="Shortcuts: `mlx tune lora ARGS` is `mlx train lora_finetune ARGS` "
                            "(also qlora, full, dpo, distill); `mlx tune search`: an Optuna "
                            "search, shareable across processes.", no_args_is_help=True)

OVERRIDES_HELP = ("Config overrides in Hydra's syntax: key=value, group=option, +new_key=value, "
                  "~key; with -m, comma lists sweep (optimizer.lr=1e-4,3e-4).")
CONFIG_DIR_HELP = ("A directory searched before the package's configs (see `mlx recipes copy`).")
NPROC_HELP = ("Processes to train on (torchrun, data-parallel: DDP, or FSDP2 with "
              "train.strategy=fsdp); data.bs stays the global batch. With -m, each sweep job "
              "runs on N processes, one job after another.")
JOBS_HELP = ("With -m: run N sweep jobs at a time on this machine, each with 1/N of the cores "
             "(its output in output_dir/<job>/job.log). For a cluster: hydra/launcher=submitit_slurm.")


@recipes_app.command("list")
@clean_errors
def list_recipes():
    """The registered recipes."""
    from mlx_core import registry
    from mlx_train import recipes

    recipes.names()
    table = Table("recipe", "description", "config")
    for name, recipe in registry.recipes.items():
        table.add_row(name, recipe.description, recipe.config_name)
    console.print(table)


@recipes_app.command("show")
@clean_errors
def show(recipe: str = typer.Argument(..., help="A recipe name (mlx recipes list)."),
         overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
         config_dir: Path = typer.Option(None, "--config-dir", help=CONFIG_DIR_HELP)):
    """Print the recipe's composed config (YAML) with the overrides applied."""
    from mlx_train import recipes

    typer.echo(recipes.to_yaml(recipes.compose(recipe, overrides or [], config_dir)), nl=False)


@recipes_app.command("copy")
@clean_errors
def copy(recipe: str = typer.Argument(..., help="A recipe name (mlx recipes list)."),
         directory: Path = typer.Argument(..., help="Where to write recipe/<name>.yaml."),
         force: bool = typer.Option(False, "--force", help="Overwrite existing files.")):
    """Copy a recipe's config for editing; run it with `mlx train RECIPE --config-dir DIR`."""
    from mlx_train import recipes

    for path in recipes.copy(recipe, directory, force=force):
        console.print(f"wrote {escape(str(path))}", highlight=False)
    console.print(f"edit them, then: mlx train {recipe} --config-dir {escape(str(directory))}",
                  highlight=False)


def run_recipe(recipe: str, overrides: list[str] | None, config_dir: Path | None,
               multirun: bool, nproc: int = 1, jobs: int = 1) -> None:
    from mlx_train import recipes
    from mlx_train.runner import optuna_search

    if not multirun:
        if optuna_search.requested(overrides):
            raise ValueError("hydra/sweeper=optuna runs a search of several trials: add -m")
        if jobs != 1:
            raise ValueError("--jobs N runs N sweep jobs at a time: add -m and sweep something "
                             "(e.g. optimizer.lr=1e-4,3e-4), or drop --jobs")
        if nproc != 1:
            from mlx_train.runner.launch import launch

            launch(recipe, overrides or [], config_dir, nproc)
        else:
            recipes.run(recipe, overrides or [], config_dir)
        return
    from mlx_train.runner.multirun import table

    if optuna_search.requested(overrides):  # an Optuna search instead of the grid
        if nproc != 1 or jobs != 1:
            raise ValueError("an Optuna search (hydra/sweeper=optuna) runs its trials in this "
                             "process: drop --nproc/--jobs, and for trials in parallel start "
                             "several `mlx tune search ... --storage FILE` processes on one study")
        run_optuna(recipe, overrides, config_dir)
        return
    done = recipes.sweep(recipe, overrides or [], config_dir, nproc, jobs)
    title = f"mlx train {recipe} -m" + (f" --nproc {nproc}" if nproc != 1 else "") + \
        (f" --jobs {jobs}" if jobs != 1 else "")
    Console().print(table(done, title=title))  # the terminal's width now
    failed = [i for i, job in enumerate(done) if job.error]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(done)} sweep jobs failed: {failed}")


def run_optuna(recipe: str, overrides: list[str], config_dir: Path | None) -> None:
    """An Optuna search (or one worker of a shared one): trials, table, plots, best config."""
    from mlx_train import recipes
    from mlx_train.runner import optuna_search
    from mlx_train.runner.multirun import table

    entry = recipes.get(recipe)
    study = optuna_search.open_study(entry, overrides)
    trials, best = optuna_search.run_search(entry, overrides, config_dir, study)
    Console().print(table(trials, title=f"mlx train {recipe} -m hydra/sweeper=optuna"))
    for path in optuna_search.finish_search(entry, overrides, trials, best, config_dir, study):
        console.print(f"wrote {escape(str(path))}", highlight=False)
    if best is not None:
        metric = optuna_search.parse(overrides).settings["metric"]
        shown = " ".join(f"{k}={v}" for k, v in trials[best].swept.items())
        console.print(f"[bold]best trial {trials[best].number}[/bold]: {escape(shown)}, "
                      f"{metric}={trials[best].metrics[metric]:.4g} "
                      f"({escape(trials[best].output_dir)})", highlight=False)
    optuna_search.check_failures(trials, overrides)


@clean_errors
def train(recipe: str = typer.Argument(..., help="A recipe name (mlx recipes list)."),
          overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
          config_dir: Path = typer.Option(None, "--config-dir", help=CONFIG_DIR_HELP),
          multirun: bool = typer.Option(False, "-m", "--multirun",
                                        help="Sweep: run every combination of comma lists."),
          nproc: int = typer.Option(1, "--nproc", help=NPROC_HELP),
          jobs: int = typer.Option(1, "--jobs", "-j", help=JOBS_HELP)):
    """Compose a recipe's Hydra config with key=value overrides and run it."""
    run_recipe(recipe, overrides, config_dir, multirun, nproc, jobs)


def _tune_command(alias: str, recipe: str):
    @clean_errors
    def command(overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
                config_dir: Path = typer.Option(None, "--config-dir", help=CONFIG_DIR_HELP),
                multirun: bool = typer.Option(False, "-m", "--multirun",
                                              help="Sweep: run every combination of comma lists."),
                nproc: int = typer.Option(1, "--nproc", help=NPROC_HELP),
                jobs: int = typer.Option(1, "--jobs", "-j", help=JOBS_HELP)):
        run_recipe(recipe, overrides, config_dir, multirun, nproc, jobs)

    command.__doc__ = f"`mlx train {recipe}`: the same arguments."
    command.__name__ = alias
    return command


def _add_tune_commands() -> None:
    from mlx_train.recipes import TUNE_ALIASES

    for alias, recipe in TUNE_ALIASES.items():
        tune_app.command(alias)(_tune_command(alias, recipe))
    tune_app.command("search")(search)


@clean_errors
def search(recipe: str = typer.Argument(..., help="A recipe (mlx recipes list) or a tune alias "
                                        "(lora, qlora, full, dpo, distill)."),
           overrides: list[str] = typer.Argument(None, help="Overrides; the search space in "
                                                 "Hydra's sweep syntax: 'optimizer.lr=tag(log, "
                                                 "interval(1e-4,1e-2))' adapter.r=4,8."),
           storage: str = typer.Option(None, "--storage", help="Share the study: an SQLAlchemy "
                                       "URL (sqlite:///study.db) or a journal file "
                                       "(journal:study.journal or *.journal). Every process "
                                       "started with it works on the same study."),
           study_name: str = typer.Option(None, "--study-name", help="The study's name (with "
                                          "--storage, default mlx-RECIPE)."),
           n_trials: int = typer.Option(None, "--n-trials", help="Trials in total, over every "
                                        "process sharing the study (default 20)."),
           pruner: str = typer.Option(None, "--pruner", help="median, hyperband, "
                                      "successive_halving or nop: stop bad trials early on "
                                      "their per-epoch metric."),
           metric: str = typer.Option(None, "--metric", help="The metric to optimise (default "
                                      "valid_loss)."),
           direction: str = typer.Option(None, "--direction", help="minimize (default) or "
                                         "maximize."),
           config_dir: Path = typer.Option(None, "--config-dir", help=CONFIG_DIR_HELP)):
    """An Optuna search: `mlx train RECIPE -m hydra/sweeper=optuna ...` with its settings as
    options; start it several times with one --storage to search in parallel."""
    from mlx_train.recipes import TUNE_ALIASES
    from mlx_train.runner.config import quote

    recipe = TUNE_ALIASES.get(recipe, recipe)
    settings = {"storage": storage, "study_name": study_name, "n_trials": n_trials,
                "metric": metric, "direction": direction}
    args = ["hydra/sweeper=optuna", *(overrides or [])]
    args += [f"hydra.sweeper.{k}={quote(v)}" for k, v in settings.items() if v is not None]
    if pruner is not None:
        args.append(f"hydra/sweeper/pruner={pruner}")
    run_optuna(recipe, args, config_dir)


_add_tune_commands()


@clean_errors
def quickstart(steps: int = typer.Option(None, "--steps", help="Training steps (batches of 8); "
                                          "default 40, or 6 with --quick."),
               output: Path = typer.Option(None, "--output", help="The run directory (default: "
                                           "./mlx-quickstart, numbered if taken)."),
               quick: bool = typer.Option(False, "--quick", help="A much shorter run (for tests)."),
               model: str = typer.Option("smollm2-135m-instruct", "--model",
                                         help="The model to tune (a name or HF directory).")):
    """LoRA-tune the built-in model on a synthetic task and show what it learned."""
    from mlx_train.quickstart import quickstart as run

    run(steps=steps, output=output, quick=quick, model=model)


# `mlx bench learner` (registered by the plugin; here, not in bench.py, which imports torch)
def bench_learner(quick: bool = typer.Option(False, "--quick", help="A few batches and repeats "
                                                                    "(a smoke test; noisy)."),
                  batches: int = typer.Option(0, "--batches", help="Training batches per epoch "
                                              "(default 200, 20 with --quick)."),
                  repeats: int = typer.Option(0, "--repeats", help="Timed epochs per side "
                                              "(default 11, 3 with --quick)."),
                  bs: int = typer.Option(64, "--bs"), width: int = typer.Option(256, "--width"),
                  threads: int = typer.Option(1, "--threads", help="torch CPU threads."),
                  json_path: str = typer.Option("", "--json", help="Also write the result here.")):
    """The Learner's per-batch overhead vs a hand-written PyTorch loop (ratio; goal <= 1.05)."""
    import json

    from rich.console import Console
    from rich.table import Table

    from mlx_train.bench import run  # torch: imported when the command runs

    result = run(quick, batches or None, repeats or None, bs, width, threads=threads)
    table = Table("side", "fastest epoch (s)", "per batch (ms)",
                  title=f"mlx bench learner: MLP width {width}, {result['n_batches']} batches "
                        f"of {bs}, {result['repeats']} repeats, {threads} thread(s)")
    for name in ("learner", "hand"):
        s = result[f"{name}_s"]
        table.add_row("Learner.fit" if name == "learner" else "hand-written loop", f"{s:.4f}",
                      f"{s / (result['n_batches'] + 1) * 1e3:.3f}")
    Console().print(table)
    print(f"ratio (learner / hand): {result['ratio']:.3f} (medians: {result['median_ratio']:.3f})"
          f"  overhead per batch: "
          f"{result['overhead_per_batch_us']:.1f} us  max weight difference: "
          f"{result['max_weight_difference']:.1e}")
    if json_path:
        with open(json_path, "w") as f:
            f.write(json.dumps(result, indent=2))


__all__ = ["bench_learner", "quickstart", "recipes_app", "train", "tune_app"]
