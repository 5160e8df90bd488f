"""Recipe registry, Hydra composition, validation before any work, `mlx recipes`, `--config-dir`."""

import functools

import pytest
import torch
from typer.testing import CliRunner

from mlx_core import registry
from mlx_core.cli.app import build_app
from mlx_train import recipes
from mlx_train.recipes import RecipeConfigError
from mlx_train.recipes.base import instantiate, optimizer_and_lr

runner = CliRunner()


def mlx(*args):
    return runner.invoke(build_app(), [str(a) for a in args])


def test_recipes_are_registered_through_the_plugin_entry_point():
    from importlib.metadata import entry_points

    assert "mlx_train.plugin:register" in {e.value for e in entry_points(group="mlx.plugins")}
    build_app()  # loads the plugins
    for name in ("full_finetune", "lora_finetune", "qlora_finetune", "pretrain"):
        assert name in registry.recipes
    with pytest.raises(KeyError, match="Did you mean: lora_finetune"):
        recipes.get("lora_finetun")
    done = mlx("recipes", "list")
    assert done.exit_code == 0 and "qlora_finetune" in done.output and "pretrain" in done.output


def test_composed_configs_share_groups_and_differ_where_they_should():
    lora = recipes.compose("lora_finetune")
    qlora = recipes.compose("qlora_finetune")
    full = recipes.compose("full_finetune")
    assert lora.quantize is None and qlora.quantize == "nf4" and qlora.adapter == lora.adapter
    assert "_target_" not in full.adapter and full.optimizer.lr < lora.optimizer.lr
    assert recipes.compose("pretrain", ["data.path=x"]).model.preset == "tiny-llama"


def test_swapping_the_optimizer_is_one_override():
    model = torch.nn.Linear(2, 2)
    opt_func, lr = optimizer_and_lr(recipes.compose("lora_finetune", ["optimizer=sgd",
                                                                      "optimizer.lr=0.5"]))
    opt = opt_func(model.parameters(), lr=lr)
    assert isinstance(opt, torch.optim.SGD) and lr == 0.5 and opt.defaults["momentum"] == 0.9
    adamw_func, _ = optimizer_and_lr(recipes.compose("lora_finetune"))
    assert isinstance(adamw_func, functools.partial) and adamw_func.func is torch.optim.AdamW
    sched = instantiate(recipes.compose("lora_finetune", ["scheduler=flat_cos"]).scheduler)
    assert type(sched).__name__ == "FlatCos" and sched.pct_start == 0.75


@pytest.mark.parametrize("override, expected", [
    ("optimizer=adamx", ["Could not find 'optimizer/adamx'", "Available options", "adamw", "sgd"]),
    ("optimizer.lrr=1", ["Could not override 'optimizer.lrr'", "Valid keys under 'optimizer'",
                         "Did you mean: optimizer.lr?"]),
    ("epoch=3", ["Could not override 'epoch'", "Did you mean: epochs?"]),
    ("epochs=abc", ["epochs:", "could not be converted to Integer"]),
    ("adapter.r=x", ["adapter.r='x'", "LoraConfig expects int"]),
    ("+optimizer.foo=1", ["AdamW takes no parameter 'foo'", "weight_decay"]),
    ("scheduler=cosine", ["Available options in 'scheduler'", "one_cycle", "flat_cos"]),
    ("quantize=int8", ["quantize must be null or nf4"]),
    ("data=instruct", ["missing required value(s): data.train_files"]),
    ("epochs=0", ["epochs must be at least 1"]),
])
def test_wrong_keys_and_values_fail_with_hydras_message_and_the_choices(override, expected):
    with pytest.raises(RecipeConfigError) as e:
        recipes.compose("lora_finetune", [override])
    for text in expected:
        assert text in str(e.value)


def test_a_bad_override_fails_before_any_work(tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr("mlx_train.recipes.components.pretrained_model", must_not_run)
    done = mlx("train", "lora_finetune", f"output_dir={tmp_path / 'run'}", "optimizer.lrr=1")
    assert done.exit_code == 1 and "Did you mean: optimizer.lr?" in done.output
    assert "Traceback" not in done.output and not (tmp_path / "run").exists()
    done = mlx("tune", "lora", f"output_dir={tmp_path / 'run'}", "optimizer=adamx")
    assert done.exit_code == 1 and "Available options" in done.output


def test_show_prints_the_composed_yaml_with_overrides():
    done = mlx("recipes", "show", "lora_finetune", "optimizer=sgd", "adapter.r=4", "seed=7")
    assert done.exit_code == 0, done.output
    assert "_target_: torch.optim.SGD" in done.output and "r: 4" in done.output
    assert "seed: 7" in done.output and "${" not in done.output  # interpolations resolved


def test_copy_then_train_from_the_edited_copy(tmp_path):
    done = mlx("recipes", "copy", "qlora_finetune", tmp_path / "conf")
    assert done.exit_code == 0, done.output
    qlora = tmp_path / "conf" / "recipe" / "qlora_finetune.yaml"
    lora = tmp_path / "conf" / "recipe" / "lora_finetune.yaml"   # the recipe it builds on
    assert qlora.is_file() and lora.is_file() and "--config-dir" in done.output
    lora.write_text(lora.read_text().replace("epochs: 1", "epochs: 5"))
    (tmp_path / "conf" / "optimizer").mkdir()
    (tmp_path / "conf" / "optimizer" / "mine.yaml").write_text(
        "_target_: torch.optim.SGD\n_partial_: true\nlr: 0.1\nmomentum: 0.5\n")
    cfg = recipes.compose("qlora_finetune", ["optimizer=mine"], config_dir=tmp_path / "conf")
    assert cfg.epochs == 5 and cfg.quantize == "nf4" and cfg.optimizer.momentum == 0.5
    assert recipes.compose("qlora_finetune").epochs == 1         # the package is untouched
    again = mlx("recipes", "copy", "qlora_finetune", tmp_path / "conf")
    assert again.exit_code == 1 and "--force" in again.output
    with pytest.raises(RecipeConfigError, match="no such directory"):
        recipes.compose("lora_finetune", config_dir=tmp_path / "nowhere")


@pytest.mark.parametrize("group", ["model", "data", "optimizer", "scheduler", "adapter", "logger"])
def test_every_shipped_option_composes_and_validates(group):
    from importlib import resources

    required = {"pretrained": ["model.source=x"], "instruct": ["data.train_files=x.jsonl"],
                "preference": ["data.train_files=x.jsonl"],
                "text_folder": ["data.path=texts"], "image_folder": ["data.path=images"],
                "table": ["data.path=t.csv", "data.target=y"],
                "text_classification": ["data.path=t.jsonl"]}
    options = sorted(p.name[:-5] for p in resources.files("mlx_train.conf").joinpath(group).iterdir()
                     if p.name.endswith(".yaml"))
    assert len(options) >= 2
    for option in options:
        cfg = recipes.compose("lora_finetune", [f"{group}={option}", *required.get(option, [])])
        assert (cfg[group] or {}).get("_target_") or option == "none"
