"""torchtune-style recipes over the Learner, configured by Hydra.

A recipe is a thin composition (config -> model -> adapters -> data -> Learner -> checkpoint),
registered by name in ``mlx_core.registry.recipes`` (through mlx-train's ``mlx.plugins`` entry
point) with a primary config ``recipe/<name>.yaml`` in ``mlx_train.conf``. From Python:

    from mlx_train import recipes
    cfg = recipes.compose("lora_finetune", ["optimizer=sgd", "epochs=2"])   # validated
    metrics = recipes.run("lora_finetune", ["output_dir=runs/a"])
    jobs = recipes.sweep("lora_finetune", ["optimizer.lr=1e-4,3e-4"])   # nproc=2: 2 processes a job

From the shell: ``mlx recipes list|show|copy``, ``mlx train RECIPE key=value ... [-m]``,
``mlx tune lora|qlora|full|dpo|distill ...``.
"""

from __future__ import annotations

import re
import shutil
from importlib import resources
from pathlib import Path

from mlx_train.recipes.base import Recipe
from mlx_train.runner.config import RecipeConfigError, compose_config

# What the classify recipe passes its config nodes itself (here, not in classify.py, which
# imports torch: the plugin imports this module at every `mlx` command's start).
CLASSIFY_INJECTED = {"data": ("tokenizer",), "optimizer": ("params",),
                     "learner.tabular": ("dls", "learner_kwargs"),
                     "learner.vision": ("dls", "learner_kwargs"),
                     "learner.text": ("dls", "tokenizer", "learner_kwargs")}

RECIPES = [
    Recipe("full_finetune", "Fine-tune every weight; save an HF-format model (run_dir/model).",
           "mlx_train.recipes.finetune:finetune"),
    Recipe("lora_finetune", "LoRA adapters on a frozen base; save a PEFT adapter (run_dir/adapter).",
           "mlx_train.recipes.finetune:finetune"),
    Recipe("qlora_finetune", "LoRA on an NF4-quantized frozen base; save a PEFT adapter.",
           "mlx_train.recipes.finetune:finetune"),
    Recipe("pretrain", "Train a small Llama-family preset from scratch on a folder of .txt files.",
           "mlx_train.recipes.pretrain:pretrain"),
    Recipe("dpo", "Direct Preference Optimization on prompt/chosen/rejected pairs (LoRA by "
           "default); save a PEFT adapter.", "mlx_train.recipes.dpo:dpo"),
    Recipe("distill", "Knowledge distillation: a student learns a frozen teacher's token "
           "distributions (forward KL) and the labels.", "mlx_train.recipes.distill:distill"),
    Recipe("classify", "Classify a table, images or texts (tabular / vision / text learners); "
           "export the learner.", "mlx_train.recipes.classify:classify",
           injected=CLASSIFY_INJECTED),
]

# `mlx tune NAME` -> recipe
TUNE_ALIASES = {"lora": "lora_finetune", "qlora": "qlora_finetune", "full": "full_finetune",
                "dpo": "dpo", "distill": "distill"}


def register() -> None:
    """Add the built-in recipes to ``mlx_core.registry.recipes`` (idempotent)."""
    from mlx_core import registry

    for recipe in RECIPES:
        if recipe.name not in registry.recipes:
            registry.recipes.register(recipe.name, recipe)


def get(name: str) -> Recipe:
    """The registered recipe ``name`` (an error names close matches and lists them all)."""
    from mlx_core import registry
    from mlx_core.plugins import load_plugins

    load_plugins()
    register()  # also when mlx-train is importable but not installed with its entry point
    return registry.recipes.get(name)


def names() -> list[str]:
    from mlx_core import registry
    from mlx_core.plugins import load_plugins

    load_plugins()
    register()
    return registry.recipes.names()


def compose(name: str, overrides=(), config_dir=None):
    """The composed, validated config of recipe ``name`` (an ``omegaconf.DictConfig``)."""
    return compose_config(get(name), overrides, config_dir)


def to_yaml(cfg) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(cfg, resolve=True)


def run(name: str, overrides=(), config_dir=None) -> dict:
    """Compose recipe ``name`` with ``overrides``, validate, run; returns the final metrics."""
    recipe = get(name)
    return recipe(compose_config(recipe, overrides, config_dir))


def sweep(name: str, overrides=(), config_dir=None, nproc: int = 1, jobs: int = 1):
    """Run the cartesian product of comma-list overrides (see ``mlx_train.runner.multirun``),
    each job on ``nproc`` processes when ``nproc > 1``, ``jobs`` jobs at a time."""
    from mlx_train.runner.multirun import run_sweep

    return run_sweep(get(name), overrides, config_dir, nproc, jobs)


def config_file(config_module: str, config_name: str) -> Path:
    """A packaged YAML config, e.g. ``("mlx_train.conf", "recipe/lora_finetune")``."""
    path = resources.files(config_module).joinpath(f"{config_name}.yaml")
    if not path.is_file():
        raise FileNotFoundError(f"no {config_name}.yaml in {config_module}")
    return Path(str(path))


_PARENT = re.compile(r"^\s*-\s*/(recipe/[\w.-]+)\s*$", re.M)


def copy(name: str, directory: str | Path, force: bool = False) -> list[Path]:
    """Copy recipe ``name``'s primary config (and the recipe configs it builds on) into
    ``directory/recipe/`` for editing; ``mlx train NAME --config-dir DIRECTORY`` then uses the
    copies, and everything not copied still comes from the package."""
    recipe = get(name)
    out = Path(directory).expanduser()
    todo, files = [recipe.config_name], []
    while todo:
        config_name = todo.pop(0)
        source = config_file(recipe.config_module, config_name)
        target = out / f"{config_name}.yaml"
        if target.exists() and not force:
            raise FileExistsError(f"{target} exists; pass --force to overwrite it")
        files.append((source, target))
        todo += [p for p in _PARENT.findall(source.read_text()) if p not in todo]
    for source, target in files:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return [t for _, t in files]


__all__ = ["RECIPES", "TUNE_ALIASES", "Recipe", "RecipeConfigError", "compose", "copy", "get",
           "names", "register", "run", "sweep", "to_yaml"]
