"""`mlx train RECIPE -m hydra/sweeper=optuna ...`: an Optuna search with the command line of
Hydra's Optuna sweeper, on a tiny model; the search space parsed from Hydra's grammar."""

import json
import re

import pytest
from typer.testing import CliRunner

from mlx_core.cli.app import build_app
from mlx_train import recipes
from mlx_train.recipes import RecipeConfigError
from mlx_train.runner.optuna_search import parse, run_search

optuna = pytest.importorskip("optuna")


def test_a_search_runs_trials_and_names_the_best(tiny_overrides, tmp_path):
    out = tmp_path / "search"
    args = ["train", "lora_finetune", "-m", *tiny_overrides, f"output_dir={out}", "epochs=1",
            "eval.exact_match=false", "logger=none", "save.checkpoint_every=0",
            "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra/sweeper/sampler=random",
            "hydra.sweeper.sampler.seed=0", "optimizer.lr=tag(log, interval(1e-3, 1e-1))",
            "adapter.r=2,4"]
    result = CliRunner().invoke(build_app(), args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "hydra/sweeper=optuna" in result.output and "best trial" in result.output
    trials = [json.loads((out / str(i) / "metrics.json").read_text()) for i in range(3)]
    configs = [(out / str(i) / "config.yaml").read_text() for i in range(3)]
    lrs = [float(c.split("lr: ")[1].split()[0]) for c in configs]
    assert all(1e-3 <= lr <= 1e-1 for lr in lrs) and len(set(lrs)) == 3
    best = min(range(3), key=lambda i: trials[i]["valid_loss"])
    assert f"best trial {best}:" in result.output
    assert f"valid_loss={trials[best]['valid_loss']:.4g}" in result.output
    for written in ("sweep.csv", "sweep.png", "optuna_history.png", "optuna_importances.png",
                    "best/recipe/lora_finetune.yaml"):
        assert (out / written).is_file(), written


def test_the_search_space_follows_the_optuna_sweeper():
    s = parse(["hydra/sweeper=optuna", "hydra.sweeper.n_trials=4", "epochs=2",
               "optimizer.lr=interval(1e-4, 1e-2)", "hydra.sweeper.params.adapter.r=4,8",
               "x=tag(log, interval(1, 64))", "y=range(1, 10, 3)", "z=choice(adamw, sgd)",
               "hydra.sweeper.direction=maximize", "hydra.sweeper.metric=exact_match"])
    d = optuna.distributions
    assert s.fixed == ["epochs=2"] and s.settings["n_trials"] == 4
    assert s.space["optimizer.lr"] == d.FloatDistribution(1e-4, 1e-2)
    assert s.space["adapter.r"] == d.CategoricalDistribution(["4", "8"])
    assert s.space["x"] == d.FloatDistribution(1, 64, log=True)  # Hydra: interval bounds are floats
    assert s.space["y"] == d.IntDistribution(1, 7, step=3)  # range() excludes its stop
    assert s.space["z"] == d.CategoricalDistribution(["adamw", "sgd"])
    assert s.settings["direction"] == "maximize" and s.settings["metric"] == "exact_match"


@pytest.mark.parametrize("bad, message", [
    (["epochs=2"], "nothing to search"),
    (["lr=interval(1e-2, 1e-4)"], "low < high"),
    (["lr=tag(log, interval(0.0, 1.0))"], "low > 0"),
    (["lr=1,2", "hydra.sweeper.n_trial=3"], "hydra.sweeper.n_trials"),
    (["lr=1,2", "hydra.sweeper.direction=down"], "minimize or maximize"),
    (["lr=1,2", "hydra/sweeper/sampler=bayes"], "tpe, random, grid"),
    (["lr=interval(0.1, 1.0)", "hydra/sweeper/sampler=grid"], "lists or int ranges"),
])
def test_bad_searches_name_the_fix(bad, message):
    with pytest.raises(RecipeConfigError, match=message):
        parse(["hydra/sweeper=optuna", *bad])


def test_the_space_is_checked_against_the_config_before_any_trial(tiny_overrides):
    with pytest.raises(RecipeConfigError, match="optimizer.lrr"):
        run_search(recipes.get("lora_finetune"),
                   [*tiny_overrides, "hydra/sweeper=optuna", "optimizer.lrr=interval(0.1, 1.0)"])
    with pytest.raises(RecipeConfigError, match="sampler.sed"):
        run_search(recipes.get("lora_finetune"),
                   [*tiny_overrides, "hydra/sweeper=optuna", "hydra.sweeper.sampler.sed=1",
                    "optimizer.lr=interval(0.1, 1.0)"])
    result = CliRunner().invoke(build_app(), ["train", "lora_finetune", *tiny_overrides,
                                              "hydra/sweeper=optuna", "optimizer.lr=1,2"])
    assert result.exit_code != 0 and "add -m" in result.output


# -- shared storage, killed workers, pruning, the best config, plots ---------------------------
SEARCH_FAST = ["eval.exact_match=false", "logger=none", "save.checkpoint_every=0"]


def _journal(path):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(str(path)))


def test_pruning_stops_a_bad_trial_and_the_best_config_runs(tiny_overrides, tmp_path):
    from mlx_train.runner.optuna_search import finish_search

    out, journal = tmp_path / "search", tmp_path / "study.journal"
    study = optuna.create_study(study_name="prune", storage=_journal(journal))
    study.enqueue_trial({"optimizer.lr": 3e-2})   # a good trial first, then a hopeless one
    study.enqueue_trial({"optimizer.lr": 1e-7})
    overrides = [*tiny_overrides, *SEARCH_FAST, f"output_dir={out}", "epochs=3",
                 "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2",
                 f"hydra.sweeper.storage=journal:{journal}", "hydra.sweeper.study_name=prune",
                 "hydra/sweeper/pruner=median", "hydra.sweeper.pruner.n_startup_trials=1",
                 "optimizer.lr=tag(log, interval(1e-8, 1e-1))"]
    recipe = recipes.get("lora_finetune")
    trials, best = run_search(recipe, overrides)
    good, bad = optuna.load_study(study_name="prune", storage=_journal(journal)).get_trials()
    assert good.state.name == "COMPLETE" and sorted(good.intermediate_values) == [0, 1, 2]
    assert bad.state.name == "PRUNED" and max(bad.intermediate_values) < 2  # before epoch 3
    assert json.loads((out / "1" / "metrics.json").read_text())["epochs"] < 3
    assert [t.status() for t in trials] == ["ok", "pruned after epoch 0"] and best == 0

    written = {p.name for p in finish_search(recipe, overrides, trials, best)}
    assert {"sweep.csv", "sweep.png", "optuna_history.png", "optuna_intermediate.png",
            "lora_finetune.yaml"} <= written
    assert all((out / name).stat().st_size > 1000 for name in written if name.endswith(".png"))
    again = recipes.run("lora_finetune", [], config_dir=out / "best")  # the best trial, rerun
    assert again["valid_loss"] == pytest.approx(trials[best].metrics["valid_loss"], rel=1e-5)
    assert (out / "best-run" / "metrics.json").is_file()


def _worker(args, log):
    import subprocess
    import sys
    from pathlib import Path

    mlx = Path(sys.executable).parent / "mlx"
    return subprocess.Popen([str(mlx), "tune", "search", "lora", *args], stdout=log,
                            stderr=subprocess.STDOUT, env={**__import__("os").environ,
                                                           "OMP_NUM_THREADS": "1",
                                                           "COLUMNS": "200"})


@pytest.mark.slow
def test_two_workers_share_a_journal_and_a_killed_workers_trial_is_retried(
        tiny_overrides, tmp_path):
    import signal
    import time

    out, journal = tmp_path / "search", tmp_path / "study.journal"
    items = (tmp_path / "train.jsonl").read_text() * 16  # trials of ~1 s: time to kill one mid-way
    (tmp_path / "more.jsonl").write_text(items)
    args = [*tiny_overrides, *SEARCH_FAST, f"output_dir={out}", "epochs=2",
            f"data.train_files={tmp_path / 'more.jsonl'}",
            "optimizer.lr=tag(log, interval(1e-3, 1e-1))", "adapter.r=2,4",
            "hydra.sweeper.heartbeat_interval=1", "--storage", str(journal), "--n-trials", "8"]
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(2)]
    survivor, victim = _worker(args, logs[0]), _worker(args, logs[1])
    killed = None
    try:
        deadline = time.time() + 240
        while killed is None and time.time() < deadline:  # the victim, mid-trial
            time.sleep(0.1)
            if not journal.exists():
                continue
            trials = optuna.load_study(study_name="mlx-lora_finetune",
                                       storage=_journal(journal)).get_trials()
            victims = [t for t in trials if t.user_attrs.get("worker", "").endswith(f":{victim.pid}")]
            done = sum(t.state.name == "COMPLETE" for t in victims)  # it shared the work
            mine = [t for t in victims if t.state.name == "RUNNING"]
            if done >= 1 and mine:
                victim.send_signal(signal.SIGKILL)
                killed = mine[0].number
        assert killed is not None, "the victim never ran a trial"
        assert survivor.wait(timeout=300) == 0, (tmp_path / "worker0.log").read_text()
    finally:
        for p in (survivor, victim):
            p.kill()
        for f in logs:
            f.close()
    trials = optuna.load_study(study_name="mlx-lora_finetune", storage=_journal(journal)).get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(complete) == 8, [(t.number, t.state.name) for t in trials]  # none lost, no extra
    assert [t.number for t in failed] == [killed]  # the killed worker's trial: failed, not lost
    retry = [t for t in complete if t.system_attrs.get("failed_trial") == killed]
    assert len(retry) == 1 and retry[0].params == failed[0].params  # retried with its values
    dirs = [t.user_attrs["output_dir"] for t in complete]
    assert len(set(dirs)) == 8  # no trial ran twice
    assert all(json.loads((out / str(t.number) / "metrics.json").read_text())["valid_loss"]
               == pytest.approx(t.value) for t in complete)
    workers = {t.user_attrs["worker"] for t in complete}
    assert len(workers) == 2  # both shared the work before one was killed


@pytest.mark.parametrize("bad, message", [
    (["hydra/sweeper/pruner=early"], "median, hyperband"),
    (["hydra.sweeper.heartbeat_interval=0"], "heartbeat_interval must be a positive"),
])
def test_bad_pruners_and_storages_name_the_fix(bad, message):
    with pytest.raises(RecipeConfigError, match=message):
        parse(["hydra/sweeper=optuna", "lr=1,2", *bad])


def test_a_storage_that_is_neither_url_nor_journal_is_refused(tiny_overrides):
    result = CliRunner().invoke(build_app(), ["tune", "search", "lora", *tiny_overrides,
                                              "optimizer.lr=1,2", "--storage", "study.db"])
    assert result.exit_code != 0 and "sqlite:///study.db" in result.output


def test_a_study_in_sqlite_resumes_where_it_stopped(tiny_overrides, tmp_path):
    out, db = tmp_path / "search", tmp_path / "study.db"
    args = ["tune", "search", "lora", *tiny_overrides, *SEARCH_FAST, "epochs=1",
            f"output_dir={out}", "optimizer.lr=tag(log, interval(1e-3, 1e-1))",
            "--storage", f"sqlite:///{db}", "--study-name", "resumed"]
    first = CliRunner().invoke(build_app(), [*args, "--n-trials", "2"], env={"COLUMNS": "250"})
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(build_app(), [*args, "--n-trials", "3"], env={"COLUMNS": "250"})
    assert again.exit_code == 0, again.output
    started = re.findall(r"^trial (\d+):", again.output, re.M)
    assert started == ["2"]  # only the new trial ran
    study = optuna.load_study(study_name="resumed", storage=f"sqlite:///{db}")
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE"] * 3
    assert sorted(p.name for p in out.iterdir() if p.name.isdigit()) == ["0", "1", "2"]
