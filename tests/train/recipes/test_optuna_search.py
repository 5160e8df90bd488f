"""`mlx train RECIPE -m hydra/sweeper=optuna ...`: an Optuna search with the command line of
Hydra's Optuna sweeper, on a tiny model; the search space parsed from Hydra's grammar."""

import json

import pytest
from typer.testing import CliRunner

from mlx_core.cli.app import build_app
from mlx_train import recipes
from mlx_train.recipes import RecipeConfigError
from mlx_train.recipes.optuna_search import parse, run_search

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
