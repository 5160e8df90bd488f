"""``eval=lm_eval`` in a tuning recipe: after training, the harness's tasks on what the run
saved (the base model with ``run_dir/adapter``, or ``run_dir/model``), their scores added to
the run's metrics as ``lm_eval/<task>/<metric>`` (``lm_eval_before/...`` for the base model
with ``eval.lm_eval.before=true``)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PREFIX = "lm_eval/"
BEFORE_PREFIX = "lm_eval_before/"


def requested(cfg: DictConfig) -> bool:
    return cfg.get("eval") is not None and cfg.eval.get("lm_eval") is not None


def scores_after_training(cfg: DictConfig, base_source: str, saved: Path, peft: bool) -> dict:
    """The configured tasks' scores on the saved result (and on ``base_source`` alone with
    ``before``), as flat metrics."""
    from mlx_train.distributed import is_main_process
    from mlx_train.lm_eval.evaluate import evaluate, flat_scores, results_table
    from mlx_train.recipes.base import console, say

    if not is_main_process():  # under torchrun: rank 0 evaluates what rank 0 saved
        return {}
    if peft and not base_source:
        raise ValueError("eval=lm_eval scores the saved adapter on its base model, which must be "
                         "loadable: use a model with a source (model=pretrained "
                         "model.source=NAME_OR_DIR), not a random preset")
    settings = OmegaConf.to_container(cfg.eval.lm_eval, resolve=True)
    options = dict(tasks=list(settings["tasks"]), limit=settings["limit"],
                   chat_template=settings["chat_template"], backend=settings["backend"],
                   include_path=list(settings["include_path"]), seed=cfg.seed)
    runs = [(PREFIX, str(base_source), str(saved)) if peft else (PREFIX, str(saved), None)]
    if settings["before"]:
        runs.insert(0, (BEFORE_PREFIX, str(base_source), None))
    metrics = {}
    for prefix, model, adapter in runs:
        say(f"lm_eval: {', '.join(options['tasks'])} on {model}"
            + (f" with {adapter}" if adapter else ""))
        results = evaluate(model, adapter=adapter, **options)
        console.print(results_table(results, title=f"lm_eval ({prefix.rstrip('/')})"))
        metrics.update(flat_scores(results, prefix=prefix))
    return metrics


__all__ = ["requested", "scores_after_training"]
