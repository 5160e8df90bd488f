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
optimises a task's return value), ``study_name``, ``storage`` (``make_storage``: an
SQLAlchemy URL or a journal file that several processes share), ``heartbeat_interval`` (10 s),
``grace_period`` (twice the interval) and ``max_retry`` (1: how often a killed worker's trial
is retried), ``max_failure_rate`` (0.0), ``n_jobs`` (accepted; a process runs its trials one
after another: start several on one storage); ``hydra/sweeper/sampler=tpe|random|grid|cmaes``
with ``hydra.sweeper.sampler.KEY`` passed to the sampler (``seed``, ``n_startup_trials``, ...);
``hydra/sweeper/pruner=median|hyperband|successive_halving|nop`` with
``hydra.sweeper.pruner.KEY`` passed to Optuna's pruner, fed each epoch's validation value
(``PruneTrial``). Each trial runs in ``output_dir/<trial number>``; the result is the study's
table and best trial, and ``finish_search`` writes the plots and the best trial's config.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape

from mlx_train.callback.core import Callback, CancelFitException
from mlx_train.runner.config import RecipeConfigError, quote
from mlx_train.runner.multirun import Job

SETTINGS = {"n_trials": 20, "direction": "minimize", "metric": "valid_loss", "study_name": None,
            "storage": None, "max_failure_rate": 0.0, "n_jobs": 1, "heartbeat_interval": 10,
            "grace_period": None, "max_retry": 1}
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler",
            "cmaes": "CmaEsSampler"}
PRUNERS = {"median": "MedianPruner", "hyperband": "HyperbandPruner",
           "successive_halving": "SuccessiveHalvingPruner", "nop": "NopPruner"}
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
    pruner: str | None = None
    pruner_args: dict = field(default_factory=dict)


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
        elif key == "hydra/sweeper/pruner":
            search.pruner = o.get_value_element_as_str()
            if search.pruner not in PRUNERS:
                raise RecipeConfigError(f"{o.input_line}: choose one of {', '.join(PRUNERS)}")
        elif key.startswith("hydra.sweeper.pruner."):
            search.pruner_args[key.rsplit(".", 1)[1]] = o.value()
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
    if not isinstance(s["heartbeat_interval"], int) or s["heartbeat_interval"] < 1:
        raise RecipeConfigError("hydra.sweeper.heartbeat_interval must be a positive number of "
                                f"seconds (got {s['heartbeat_interval']!r})")
    if s["max_retry"] is not None and (not isinstance(s["max_retry"], int) or s["max_retry"] < 0):
        raise RecipeConfigError("hydra.sweeper.max_retry must be null (retry a killed trial "
                                f"forever) or an int >= 0 (got {s['max_retry']!r})")
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
    from mlx_train.runner.config import compose_config

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


def make_pruner(search: Search):
    """The Optuna pruner ``hydra/sweeper/pruner=`` names (``None``: no pruning)."""
    if search.pruner is None:
        return None
    optuna = _optuna()
    cls = getattr(optuna.pruners, PRUNERS[search.pruner])
    accepted = inspect.signature(cls).parameters
    unknown = sorted(set(search.pruner_args) - set(accepted))
    if unknown:
        raise RecipeConfigError(f"hydra.sweeper.pruner.{unknown[0]}: {cls.__name__} takes no "
                                f"{unknown[0]!r}; valid: {', '.join(accepted)}")
    return cls(**search.pruner_args)


def make_storage(search: Search):
    """The study's storage from ``hydra.sweeper.storage``: ``None`` (in memory, this process
    only); an SQLAlchemy URL (``sqlite:///study.db``, ``postgresql://...``): Optuna's
    ``RDBStorage`` with its heartbeat, so a killed worker's trial is failed by the others
    (``fail_stale_trials``) and retried (``RetryFailedTrialCallback``); ``journal:PATH`` or a
    path ending ``.journal``: ``JournalStorage(JournalFileBackend(PATH))``, a file that
    processes on several machines can share (NFS). Optuna's journal storage has no heartbeat,
    so the running trial's worker records one as a trial system attribute
    (``mlx:heartbeat``) and ``fail_stale`` applies the same rule to it."""
    url = search.settings["storage"]
    if url is None:
        return None
    optuna = _optuna()
    url = str(url)
    s = search.settings
    retry = _retry_callback(s["max_retry"])
    if url.startswith("journal:") or url.endswith(".journal"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url.removeprefix("journal:")).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" in url:
        import warnings

        with warnings.catch_warnings():  # Optuna calls its heartbeat experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # the callback's keyword was renamed in Optuna 4.9
            accepted = inspect.signature(optuna.storages.RDBStorage).parameters
            callback = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" \
                in accepted else "failed_trial_callback"
            return optuna.storages.RDBStorage(url, heartbeat_interval=s["heartbeat_interval"],
                                              grace_period=_grace(s), **{callback: retry})
    raise RecipeConfigError(f"hydra.sweeper.storage={url}: give an SQLAlchemy URL (e.g. "
                            "sqlite:///study.db) or a journal file (journal:study.journal, or a "
                            "path ending .journal)")


def _retry_callback(max_retry):
    """Optuna's callback that enqueues a stale trial again with the same values (named
    ``RetryHeartbeatStaleTrialCallback`` since Optuna 4.9, ``RetryFailedTrialCallback`` before)."""
    import warnings

    optuna = _optuna()
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return cls(max_retry=max_retry)


def _grace(settings: dict) -> int:
    return int(settings["grace_period"] or 2 * settings["heartbeat_interval"])


HEARTBEAT = "mlx:heartbeat"


class _Heartbeat:
    """While a trial runs: its heartbeat every ``interval`` seconds from a thread (RDB:
    Optuna's ``record_heartbeat``; journal: the ``mlx:heartbeat`` system attribute)."""

    def __init__(self, study, trial, interval: float):
        import threading

        self.study, self.trial, self.interval = study, trial, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        storage = self.study._storage
        while True:
            if hasattr(storage, "record_heartbeat") and _native_heartbeat(storage):
                storage.record_heartbeat(self.trial._trial_id)
            else:
                storage.set_trial_system_attr(self.trial._trial_id, HEARTBEAT, time.time())
            if self.stop.wait(self.interval):
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def _native_heartbeat(storage) -> bool:
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    return isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage)


def fail_stale(study, search: Search) -> None:
    """Fail the trials whose worker stopped beating (killed, crashed machine) and enqueue their
    retries: Optuna's ``fail_stale_trials`` for RDB storages, the same rule over the
    ``mlx:heartbeat`` attribute for a journal."""
    optuna = _optuna()
    storage = study._storage
    if storage is None or search.settings["storage"] is None:
        return
    if _native_heartbeat(storage):
        optuna.storages.fail_stale_trials(study)
        return
    grace, now = _grace(search.settings), time.time()
    retry = _retry_callback(search.settings["max_retry"])
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        # a worker killed before its first beat: count from the trial's start
        beat = t.system_attrs.get(HEARTBEAT) or (t.datetime_start.timestamp()
                                                 if t.datetime_start else None)
        if beat is None or now - float(beat) <= grace:
            continue
        try:
            if not storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it first
            continue
        retry(study, study._storage.get_trial(t._trial_id))


class PruneTrial(Callback):
    """A Learner callback: after each epoch, report the search metric to the trial
    (``trial.report``) and stop the fit when the pruner says so (``CancelFitException``: the
    run ends as after its last epoch, its files written)."""

    order = 60  # after the Recorder (50) has the epoch's values

    def __init__(self, trial, metric: str):
        super().__init__()
        self.trial, self.metric, self.pruned_at = trial, metric, None

    def after_epoch(self) -> None:
        history = self.learn.recorder.history()
        if not history:
            return
        row = history[-1]
        value = row.get(self.metric)
        if not isinstance(value, (int, float)):
            raise ValueError(f"pruning needs hydra.sweeper.metric={self.metric} every epoch, but "
                             f"the recipe logs only {', '.join(k for k in row if k != 'epoch')} "
                             "per epoch: choose one of them, or drop hydra/sweeper/pruner")
        epoch = int(row["epoch"])
        self.trial.report(float(value), epoch)
        if self.trial.should_prune():
            self.pruned_at = epoch
            raise CancelFitException()


def open_study(recipe, overrides):
    """The search's Optuna study: created, or loaded from ``hydra.sweeper.storage`` when it
    is there (then named ``hydra.sweeper.study_name``, default ``mlx-RECIPE``)."""
    optuna = _optuna()
    search = parse(overrides)
    s = search.settings
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what runs
    storage = make_storage(search)
    study_name = s["study_name"] or (f"mlx-{recipe.name}" if storage is not None else None)
    return optuna.create_study(direction=s["direction"], sampler=make_sampler(search),
                               pruner=make_pruner(search) or optuna.pruners.NopPruner(),
                               study_name=study_name, storage=storage,
                               load_if_exists=storage is not None)


def run_search(recipe, overrides, config_dir=None, study=None) -> tuple[list[Job], int | None]:
    """Run (or join) the Optuna search (in ``study``, default ``open_study``'s); returns
    ``(jobs, best)``: one ``Job`` per trial of the study, this process's and other workers'
    (its sampled values in ``swept``, its number in ``number``), and the index of the best one
    (``None`` when no trial finished).

    ``hydra.sweeper.n_trials`` counts the study's trials in total, over every process that
    shares its storage: a worker takes trials until that many are finished (complete or
    pruned); a failed trial (a killed worker's, once its heartbeat is stale) does not count and
    its retry, with the same values, is enqueued for whichever worker is free."""
    from mlx_train.recipes.base import added_callbacks, say

    optuna = _optuna()
    search, base = plan(recipe, overrides, config_dir)
    s = search.settings
    study = study or open_study(recipe, overrides)
    storage = study._storage if s["storage"] is not None else None
    study_name = study.study_name
    metric, n_trials = s["metric"], s["n_trials"]
    where = f", study {study_name} in {s['storage']}" if storage is not None else ""
    say(f"search: {n_trials} trial(s) of {recipe.name}, {s['direction']} {metric} "
        f"({search.sampler} sampler{', ' + search.pruner + ' pruner' if search.pruner else ''}"
        f"{escape(where)})")
    while True:
        fail_stale(study, search)
        trials = study.get_trials(deepcopy=False)
        if _count(trials, FINISHED) >= n_trials:
            break
        if _count(trials, TAKEN) >= n_trials:
            if storage is None or not any(t.state == optuna.trial.TrialState.RUNNING
                                          for t in trials):
                break
            # other workers' trials are running: wait for them to end, or to go stale and be
            # retried here
            time.sleep(min(float(s["heartbeat_interval"]), 5.0))
            continue
        trial = study.ask(search.space)
        if _count(study.get_trials(deepcopy=False), LIVE, below=trial.number) >= n_trials:
            # another worker asked for the last trial at the same moment: this one is surplus
            study._storage.set_trial_system_attr(trial._trial_id, "mlx:surplus", True)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        _run_trial(recipe, config_dir, search, base, study, trial, added_callbacks)
    return _study_jobs(study, metric)


FINISHED = ("COMPLETE", "PRUNED")
TAKEN = ("COMPLETE", "PRUNED", "RUNNING")  # a WAITING trial (enqueued, e.g. a retry) is still to take
LIVE = (*TAKEN, "WAITING")


def _count(trials, states, below: int | None = None) -> int:
    return sum(1 for t in trials if t.state.name in states
               and (below is None or t.number < below))


def _run_trial(recipe, config_dir, search: Search, base: str, study, trial, added_callbacks):
    from mlx_train.recipes.base import say
    from mlx_train.runner.config import compose_config

    optuna = _optuna()
    s = search.settings
    values = {k: _render(v) for k, v in trial.params.items()}
    job_overrides = [*search.fixed, *(f"{k}={v}" for k, v in values.items())]
    if not any(k.lstrip("+") == "output_dir" for k in values):
        job_overrides.append(f"output_dir={quote(f'{base}/{trial.number}')}")
    retried = study._storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
    again = f" (retrying trial {retried})" if retried is not None else ""
    say(f"[bold]trial {trial.number}[/bold]{again}: "
        + escape(" ".join(f"{k}={v}" for k, v in values.items())))
    prune = PruneTrial(trial, s["metric"]) if search.pruner else None
    try:
        cfg = compose_config(recipe, job_overrides, config_dir)
        trial.set_user_attr("output_dir", str(cfg.output_dir))
        trial.set_user_attr("overrides", job_overrides)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        with _Heartbeat(study, trial, float(s["heartbeat_interval"])) if study._storage is not None \
                and s["storage"] is not None else _nothing(), \
                added_callbacks(lambda cfg: [prune] if prune else []):
            metrics = recipe(cfg)
        trial.set_user_attr("metrics", _plain(metrics))
        if prune is not None and prune.pruned_at is not None:
            say(f"trial {trial.number} pruned after epoch {prune.pruned_at}")
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return
        value = metrics.get(s["metric"])
        if not isinstance(value, (int, float)):
            raise KeyError(f"hydra.sweeper.metric={s['metric']} is not among the trial's final "
                           f"metrics: {', '.join(k for k, v in metrics.items() if isinstance(v, (int, float)))}")
    except Exception as e:  # noqa: BLE001 - a failed trial is told to Optuna, the search goes on
        error = f"{type(e).__name__}: {e}"
        trial.set_user_attr("error", error)
        say(f"[red]trial {trial.number} failed[/red]: {escape(error)}")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return
    study.tell(trial, float(value))


@contextlib.contextmanager
def _nothing():
    yield


def _plain(metrics: dict) -> dict:
    """The metrics Optuna's storages can hold (JSON): numbers, strings, booleans."""
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
            for k, v in metrics.items()}


def _study_jobs(study, metric: str) -> tuple[list[Job], int | None]:
    """Every trial of the study as a ``Job`` (surplus asks left out), and the best's index."""
    trials = study.get_trials(deepcopy=False)
    retried_as = {t.system_attrs["failed_trial"]: t.number for t in trials
                  if t.system_attrs.get("failed_trial") is not None}
    jobs = []
    for t in trials:
        if t.system_attrs.get("mlx:surplus"):
            continue
        state = t.state.name.lower()
        job = Job(list(t.user_attrs.get("overrides", [])),
                  {k: _render(v) for k, v in t.params.items()},
                  t.user_attrs.get("output_dir", ""), dict(t.user_attrs.get("metrics", {})),
                  number=t.number)
        if t.state.name == "FAIL" and t.number in retried_as:  # not a failure of the search
            job.state = f"worker stopped; retried as trial {retried_as[t.number]}"
        elif t.state.name == "FAIL":
            job.error = t.user_attrs.get("error", "the worker stopped (killed or crashed; "
                                         "its heartbeat went stale)")
        elif t.state.name == "PRUNED":
            job.state = f"pruned after epoch {max(t.intermediate_values, default=0)}"
        elif t.state.name != "COMPLETE":
            job.state = state
        jobs.append(job)
    complete = [i for i, j in enumerate(jobs) if not j.error and not j.state
                and isinstance(j.metrics.get(metric), (int, float))]
    if not complete:
        return jobs, None
    best_number = study.best_trial.number
    return jobs, next((i for i in complete if jobs[i].number == best_number), complete[0])


def write_best(recipe, jobs: list[Job], best: int | None, base: str, config_dir=None) -> Path | None:
    """The best trial's config as a runnable recipe config: ``base/best/recipe/<name>.yaml``
    (every value resolved, ``output_dir`` set to ``base/best-run``); run it with
    ``mlx train RECIPE --config-dir base/best``."""
    from omegaconf import OmegaConf

    from mlx_train.runner.config import compose_config

    if best is None:
        return None
    cfg = compose_config(recipe, jobs[best].overrides, config_dir)
    cfg.output_dir = str(Path(base) / "best-run")
    directory = Path(base).expanduser() / "best"
    path = directory / f"{recipe.config_name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ("# @package _global_\n"  # a primary config in the recipe/ group, as ours are
              f"# The best trial ({jobs[best].number}) of the search in {base}:\n"
              + "".join(f"#   {k}={v}\n" for k, v in jobs[best].swept.items())
              + f"# Run it again: mlx train {recipe.name} --config-dir {directory}\n")
    path.write_text(header + OmegaConf.to_yaml(cfg, resolve=True))
    return path


def finish_search(recipe, overrides, jobs: list[Job], best: int | None, config_dir=None,
                  study=None) -> list[Path]:
    """After a search: the table and plots (``sweep.csv``, ``sweep.png``, Optuna's history,
    importance and intermediate-value plots of ``study``, loaded from the storage when not
    given) and the best trial's config (``best/``) in the search's output_dir."""
    from mlx_train.runner.config import compose_config
    from mlx_train.runner.sweep_plots import plot_study, write_results

    search = parse(overrides)
    base = str(compose_config(recipe, search.fixed, config_dir, check=False).output_dir)
    written = write_results(jobs, base, search.settings["metric"])
    if study is None and search.settings["storage"] is not None:
        study = open_study(recipe, overrides)
    if study is not None:
        written += plot_study(study, base)
    best_yaml = write_best(recipe, jobs, best, base, config_dir)
    return written + ([best_yaml] if best_yaml else [])


def check_failures(jobs: list[Job], overrides) -> None:
    """Raise when more trials failed than ``hydra.sweeper.max_failure_rate`` allows."""
    rate = float(parse(overrides).settings["max_failure_rate"])
    failed = [i for i, j in enumerate(jobs) if j.error]
    if jobs and len(failed) / len(jobs) > rate:
        raise RuntimeError(f"{len(failed)} of {len(jobs)} trials failed: {failed} (allowed: "
                           f"hydra.sweeper.max_failure_rate={rate})")


__all__ = ["PRUNERS", "SAMPLERS", "SETTINGS", "PruneTrial", "Search", "check_failures",
           "distribution", "fail_stale", "finish_search", "make_pruner", "make_sampler",
           "make_storage", "open_study", "parse", "plan", "requested", "run_search", "write_best"]
