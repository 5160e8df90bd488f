"""``full_finetune``, ``lora_finetune``, ``qlora_finetune``: one recipe, three configs.

config -> tokenizer -> data -> model (``mlx_core.load_model``) -> NF4 (``quantize=nf4``) ->
adapter (``mlx_adapters.get_peft_model``, when the ``adapter`` group is set) -> Learner ->
``run_dir/adapter`` (PEFT format) or ``run_dir/model`` (HF format, ``mlx_core.save_model``).
"""

from __future__ import annotations

import inspect
import time

from omegaconf import DictConfig

from mlx_train.lm_eval import recipe as lm_eval_recipe
from mlx_train.recipes.base import (
    RunDir,
    build_learner,
    evaluate_exact_match,
    final_metrics,
    fit,
    has_node,
    instantiate,
    save_trained,
    say,
    seed_everything,
    show_samples,
    write_metrics,
)
from mlx_train.recipes.evaluate import generate_answers
from mlx_train.runner.fsdp import on_rank0, shard_model


def resolve_tokenizer(cfg: DictConfig):
    """``cfg.tokenizer``, else the tokenizer of the model's ``source``."""
    from mlx_train.lm_data import as_tokenizer

    source = cfg.tokenizer or cfg.model.get("source")
    if not source:
        raise ValueError(f"model={cfg.model._target_.rsplit('.', 1)[-1]} has no tokenizer of its "
                         "own: set tokenizer=NAME_OR_DIR")
    return as_tokenizer(source)


def prepare_model(cfg: DictConfig, tokenizer):
    """The model, quantized and wrapped with its adapter as the config says."""
    model = instantiate(cfg.model, tokenizer=tokenizer)
    if cfg.train.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        if cfg.train.checkpoint_layers is None:
            model.gradient_checkpointing_enable()
        elif "num_layers" in inspect.signature(model.gradient_checkpointing_enable).parameters:
            model.gradient_checkpointing_enable(num_layers=cfg.train.checkpoint_layers)
        else:
            raise ValueError(f"train.checkpoint_layers={cfg.train.checkpoint_layers}: "
                             f"{type(model).__name__} checkpoints all its layers or none; use a "
                             "zoo model, or drop train.checkpoint_layers")
    if cfg.quantize and not has_node(cfg, "adapter"):
        raise ValueError(f"quantize={cfg.quantize} freezes the base model in 4 bits: it needs an "
                         "adapter to train (adapter=lora)")
    if cfg.quantize == "nf4":
        from mlx_adapters import quantize_nf4

        quantize_nf4(model)
    if has_node(cfg, "adapter"):
        from mlx_adapters import get_peft_model

        adapter = instantiate(cfg.adapter)
        adapter.base_model_name_or_path = cfg.model.get("source")
        model = get_peft_model(model, adapter)
    return model


def finetune(cfg: DictConfig) -> dict:
    """Run one fine-tuning recipe; returns (and writes to ``metrics.json``) its final metrics."""
    started = time.time()
    run = RunDir(cfg)
    seed_everything(cfg.seed)
    tokenizer = resolve_tokenizer(cfg)
    data = instantiate(cfg.data, tokenizer=tokenizer)
    model = shard_model(cfg, prepare_model(cfg, tokenizer))  # FSDP2: train.strategy=fsdp
    peft = has_node(cfg, "adapter")
    if peft:
        trainable, total = model.get_nb_trainable_parameters()
        say(f"{cfg.recipe}: {trainable:,} trainable parameters of {total:,} "
            f"({100 * trainable / total:.2f}%)")
    base_acc, base_answers = None, []
    if cfg.eval.before and not cfg.resume:
        base_acc, base_answers = on_rank0(model, lambda m: evaluate_exact_match(cfg, m, data))
        if base_acc is not None:
            say(f"exact match before training: {base_acc:.1%}")
    learn, lr = build_learner(cfg, data, model, run)
    train_s = fit(cfg, learn, lr, run)
    acc, answers = on_rank0(model, lambda m: evaluate_exact_match(cfg, m, data))
    if acc is not None:
        say(f"exact match after training: {acc:.1%}")
    if cfg.eval.samples and answers:
        if peft and not base_answers:  # the same prompts through the base model alone
            shown = [e.messages for e in data.eval_examples[: cfg.eval.samples]]

            def base_model_answers(m):
                with m.disable_adapter():
                    return generate_answers(m, tokenizer, shown, cfg.eval.max_new_tokens)

            base_answers = on_rank0(model, base_model_answers)
        labels = ("base model", "with adapter") if peft else ("before", "after")
        show_samples(data.eval_examples, dict(zip(labels, (base_answers, answers), strict=True)),
                     cfg.eval.samples)
    saved = save_trained(model, run, tokenizer, peft)
    metrics = final_metrics(learn, started, exact_match=acc, base_exact_match=base_acc,
                            train_s=train_s)
    metrics["saved"] = str(saved)
    if lm_eval_recipe.requested(cfg):  # eval=lm_eval
        metrics.update(lm_eval_recipe.scores_after_training(cfg, cfg.model.get("source"), saved,
                                                            peft))
    return write_metrics(run, metrics)


__all__ = ["finetune", "prepare_model", "resolve_tokenizer"]
