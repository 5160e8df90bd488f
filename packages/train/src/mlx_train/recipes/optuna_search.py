"""Searches: ``mlx train RECIPE -m hydra/sweeper=optuna hydra.sweeper.n_trials=8
'optimizer.lr=tag(log, interval(1e-4, 1e-2))' adapter.r=4,8,16``.

The command line of Hydra's Optuna sweeper plugin (``hydra-optuna-sweeper``), run by Optuna
itself (``pip install optuna``) in this process. The plugin cannot be used as it is: it is a
``Sweeper`` that Hydra calls only inside a ``@hydra.main`` application, while ``mlx train``
composes configs with Hydra's compose API (so it can check them and run jobs in-process), and
it pins ``optuna<3``. The search space is read from the same override grammar
(``OverridesParser``), mapped to Optuna distributions as the plugin maps them:

- ``interval(a, b)``: a float drawn from ``[a, b]`` (Hydra reads interval bounds as floats;
  ``range(a, b)`` draws ints); ``tag(log, interval(a, b))`` draws on a log scale;
- ``choice(a, b)`` or ``a,b``: categorical; ``range(a, b, step)``: the range's values (as in
  ``-m`` sweeps, ``b`` is excluded);
- ``hydra.sweeper.params.KEY=SPEC``: the same, written as the plugin's config does.

Settings (``hydra.sweeper.*``): ``n_trials`` (20), ``direction`` (``minimize`` /
``maximize``), ``metric`` (the final metric to optimise, ``valid_loss``; ours: the plugin
optimises a task's return value), ``study_name``, ``storage`` (e.g. ``sqlite:///s.db``: a
study to continue), ``max_failure_rate`` (0.0), ``n_jobs`` (accepted; trials run one after
another); ``hydra/sweeper/sampler=tpe|random|grid|cmaes`` with ``hydra.sweeper.sampler.KEY``
passed to the sampler (``seed``, ``n_startup_trials``, ...). Each trial runs in
``output_dir/<trial number>``; the result is the sweep's table and the best trial.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from mlx_train.recipes.config import RecipeConfigError, quote
from mlx_train.recipes.multirun import Job

SETTINGS = {"n_trials": 20, "direction": "minimize", "metric": "valid_loss", "study_name": None,
            "storage": None, "max_failure_rate": 0.0, "n_jobs": 1}
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler",
            "cmaes": "CmaEsSampler"}
PARAMS = "hydra.sweeper.params."


def requested(overrides) -> bool:
    """True when the overrides ask for the Optuna sweeper (``hydra/sweeper=optuna``)."""
    return any(str(o).replace(" ", "") == "hydra/sweeper=optuna" for o in overrides or [])


@dataclass
class Search:
    """A parsed search: the Optuna distributions by key, the fixed overrides, the settings."""

    space: dict = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=lambda: dict(SETTINGS))
    sampler: str = "tpe"
    sampler_args: dict = field(default_factory=dict)


def _optuna():
    try:
        import optuna
    except ImportError:
        raise RecipeConfigError("hydra/sweeper=optuna needs Optuna: pip install optuna (or "
                                "pip install 'mlx-train[search]')") from None
    return optuna


def distribution(override):
    """The Optuna distribution of a sweep override (see the module doc)."""
    from hydra.core.override_parser.types import (
        ChoiceSweep,
        IntervalSweep,
        RangeSweep,
        Transformer,
    )

    optuna = _optuna()
    dists = optuna.distributions
    value = override.value()
    key = override.get_key_element()
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        return dists.CategoricalDistribution(
            [str(v) for v in override.sweep_iterator(transformer=Transformer.encode)])
    if isinstance(value, RangeSweep):
        values = list(override.sweep_iterator())
        if not values:
            raise RecipeConfigError(f"{override.input_line}: the range is empty")
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return dists.IntDistribution(values[0], values[-1], step=int(value.step))
        return dists.FloatDistribution(values[0], values[-1], step=float(value.step))
    if isinstance(value, IntervalSweep):
        low, high, log = value.start, value.end, "log" in value.tags
        if low >= high:
            raise RecipeConfigError(f"{override.input_line}: interval(low, high) needs low < high")
        if log and low <= 0:
            raise RecipeConfigError(f"{override.input_line}: a log interval needs low > 0")
        return dists.FloatDistribution(float(low), float(high), log=log)
    raise RecipeConfigError(f"{key}: {override.input_line} is not a search space; use "
                            "interval(a,b), choice(a,b), a,b or range(a,b)")


def parse(overrides) -> Search:
    """Split the overrides into the search space, the fixed overrides and the settings."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides or []])
    except HydraException as e:
        raise RecipeConfigError(str(e)) from None
    search = Search()
    for o in parsed:
        key = o.get_key_element()
        if key == "hydra/sweeper":
            if o.get_value_element_as_str() != "optuna":
                raise RecipeConfigError(f"{o.input_line}: only hydra/sweeper=optuna is a search; "
                                        "drop it for a grid sweep (-m key=a,b)")
        elif key == "hydra/sweeper/sampler":
            search.sampler = o.get_value_element_as_str()
            if search.sampler not in SAMPLERS:
                raise RecipeConfigError(f"{o.input_line}: choose one of {', '.join(SAMPLERS)}")
        elif key.startswith(PARAMS):
            o.key_or_group = key[len(PARAMS):]
            _add(search, o)
        elif key.startswith("hydra.sweeper.sampler."):
            search.sampler_args[key.rsplit(".", 1)[1]] = o.value()
        elif key.startswith("hydra.sweeper."):
            name = key[len("hydra.sweeper."):]
            if name not in SETTINGS:
                raise RecipeConfigError(f"{key}: not a setting of the Optuna search; valid: "
                                        + ", ".join(f"hydra.sweeper.{k}" for k in SETTINGS)
                                        + ", hydra.sweeper.params.KEY, hydra.sweeper.sampler.KEY")
            search.settings[name] = o.value()
        elif key.startswith("hydra"):
            raise RecipeConfigError(f"{o.input_line}: mlx train takes no Hydra settings other "
                                    "than hydra/sweeper=optuna and hydra.sweeper.*")
        else:
            _add(search, o)
    _check(search)
    return search


def _add(search: Search, o) -> None:
    if o.is_sweep_override():
        search.space[o.get_key_element()] = distribution(o)
    else:
        search.fixed.append(f"{o.get_key_element()}={o.get_value_element_as_str()}")


def _check(search: Search) -> None:
    s = search.settings
    if not search.space:
        raise RecipeConfigError("hydra/sweeper=optuna has nothing to search: give a space, e.g. "
                                "'optimizer.lr=interval(1e-4,1e-2)' or adapter.r=4,8")
    if not isinstance(s["n_trials"], int) or s["n_trials"] < 1:
        raise RecipeConfigError(f"hydra.sweeper.n_trials must be a positive int (got {s['n_trials']!r})")
    if s["direction"] not in ("minimize", "maximize"):
        raise RecipeConfigError(f"hydra.sweeper.direction must be minimize or maximize (got "
                                f"{s['direction']!r})")
    if search.sampler == "grid":
        dists = _optuna().distributions
        bad = [k for k, d in search.space.items() if not isinstance(d, (dists.CategoricalDistribution,
                                                                          dists.IntDistribution))]
        if bad:
            raise RecipeConfigError(f"hydra/sweeper/sampler=grid needs lists or int ranges; "
                                    f"{', '.join(bad)} are intervals")


def make_sampler(search: Search):
    optuna = _optuna()
    cls = getattr(optuna.samplers, SAMPLERS[search.sampler])
    args = dict(search.sampler_args)
    accepted = inspect.signature(cls).parameters
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        raise RecipeConfigError(f"hydra.sweeper.sampler.{unknown[0]}: {cls.__name__} takes no "
                                f"{unknown[0]!r}; valid: {', '.join(accepted)}")
    if search.sampler == "grid":
        args["search_space"] = {k: _grid_values(d) for k, d in search.space.items()}
    try:
        return cls(**args)
    except ImportError as e:  # cmaes needs its own package
        raise RecipeConfigError(f"hydra/sweeper/sampler={search.sampler}: {e}") from None


def _grid_values(d) -> list:
    if hasattr(d, "choices"):
        return list(d.choices)
    return list(range(d.low, d.high + 1, d.step))


def plan(recipe, overrides, config_dir=None) -> tuple[Search, str]:
    """The parsed search and the base output directory, every searched key checked against the
    config (each choice, and each numeric range's ends) before the first trial runs."""
    from mlx_train.recipes.config import compose_config

    search = parse(overrides)
    base = str(compose_config(recipe, search.fixed, config_dir, check=False).output_dir)
    probes = []
    for key, d in search.space.items():
        values = list(d.choices) if hasattr(d, "choices") else [d.low, d.high]
        probes += [(key, v) for v in values]
    for key, value in probes:
        try:
            compose_config(recipe, [*search.fixed, f"{key}={_render(value)}"], config_dir)
        except RecipeConfigError as e:
            raise RecipeConfigError(f"search space {key}={value}: {e}") from None
    return search, base


def _render(value) -> str:
    return value if isinstance(value, str) else quote(value)


def run_search(recipe, overrides, config_dir=None) -> tuple[list[Job], int | None]:
    """Run the Optuna search; returns ``(jobs, best)``: one ``Job`` per trial (its sampled
    values in ``swept``) and the index of the best one (``None`` when every trial failed)."""
    from mlx_train.recipes.base import say
    from mlx_train.recipes.config import compose_config

    optuna = _optuna()
    search, base = plan(recipe, overrides, config_dir)
    s = search.settings
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what runs
    study = optuna.create_study(direction=s["direction"], sampler=make_sampler(search),
                                study_name=s["study_name"], storage=s["storage"],
                                load_if_exists=s["storage"] is not None)
    metric, jobs = s["metric"], []
    say(f"search: {s['n_trials']} trial(s) of {recipe.name}, {s['direction']} {metric} "
        f"({search.sampler} sampler)")
    for _ in range(s["n_trials"]):
        trial = study.ask(search.space)
        values = {k: _render(v) for k, v in trial.params.items()}
        job_overrides = [*search.fixed, *(f"{k}={v}" for k, v in values.items())]
        if not any(k.lstrip("+") == "output_dir" for k in values):
            job_overrides.append(f"output_dir={quote(f'{base}/{trial.number}')}")
        job = Job(job_overrides, values)
        jobs.append(job)
        say(f"[bold]trial {trial.number}[/bold]: " + " ".join(f"{k}={v}" for k, v in values.items()))
        try:
            cfg = compose_config(recipe, job_overrides, config_dir)
            job.output_dir = str(cfg.output_dir)
            job.metrics = recipe(cfg)
            value = job.metrics.get(metric)
            if not isinstance(value, (int, float)):
                raise KeyError(f"hydra.sweeper.metric={metric} is not among the trial's final "
                               f"metrics: {', '.join(k for k, v in job.metrics.items() if isinstance(v, (int, float)))}")
        except Exception as e:  # noqa: BLE001 - a failed trial is told to Optuna, the search goes on
            job.error = f"{type(e).__name__}: {e}"
            say(f"[red]trial {trial.number} failed[/red]: {job.error}")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        study.tell(trial, float(value))
    ok = [i for i, j in enumerate(jobs) if not j.error]
    if not ok:
        return jobs, None
    pick = min if s["direction"] == "minimize" else max
    return jobs, pick(ok, key=lambda i: jobs[i].metrics[metric])


def check_failures(jobs: list[Job], overrides) -> None:
    """Raise when more trials failed than ``hydra.sweeper.max_failure_rate`` allows."""
    rate = float(parse(overrides).settings["max_failure_rate"])
    failed = [i for i, j in enumerate(jobs) if j.error]
    if jobs and len(failed) / len(jobs) > rate:
        raise RuntimeError(f"{len(failed)} of {len(jobs)} trials failed: {failed} (allowed: "
                           f"hydra.sweeper.max_failure_rate={rate})")


__all__ = ["SAMPLERS", "SETTINGS", "Search", "distribution", "check_failures",
           "make_sampler", "parse", "plan", "requested", "run_search"]
