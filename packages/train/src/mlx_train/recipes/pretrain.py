"""``pretrain``: a small Llama-family model from a preset, trained from scratch on text files.

config -> tokenizer (``tokenizer=`` a model name / directory, or null: a byte-level BPE trained
on the files) -> data (``mlx_train.lm_data.text_folder_data``) -> model
(``mlx_core.build_model`` of the preset, vocabulary and special tokens from the tokenizer) ->
Learner -> ``run_dir/model`` (HF format with the tokenizer, ``mlx_core.save_model``).
``backend=jax`` trains the same model on the same data in JAX instead of the Learner
(``mlx_train.recipes.pretrain_jax``; needs mlx-jax).
"""

from __future__ import annotations

import time

from omegaconf import DictConfig

from mlx_train.recipes.base import (
    RunDir,
    build_learner,
    final_metrics,
    fit,
    instantiate,
    say,
    seed_everything,
    write_metrics,
)


def pretrain(cfg: DictConfig) -> dict:
    from mlx_core import generate
    from mlx_train.lm_data import as_tokenizer
    from mlx_train.runner import scaleout
    from mlx_train.runner.fsdp import on_rank0, save_full_model, shard_model

    if cfg.backend not in ("torch", "jax"):
        raise ValueError(f"backend must be 'torch' or 'jax', got {cfg.backend!r}")
    if cfg.backend == "jax":
        from mlx_train.extras import require_jax

        require_jax()  # before any work
    started = time.time()
    run = RunDir(cfg)
    seed_everything(cfg.seed)
    tokenizer = as_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    data = instantiate(cfg.data, tokenizer=tokenizer)
    tokenizer = data.tokenizer
    say(f"pretrain: {data.info}")
    model = instantiate(cfg.model, tokenizer=tokenizer)
    if cfg.backend == "jax" and scaleout.distributed():
        raise ValueError("backend=jax runs in one process; drop --nproc / torchrun, or use "
                         "backend=torch")
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than the "
                         f"tokenizer's ({tokenizer.vocab_size})")
    say(f"pretrain: {model.num_parameters():,} parameters ({model.config.model_type}, "
        f"{model.config.num_layers} layers, hidden {model.config.hidden_size})")
    if cfg.backend == "jax":
        from mlx_core import load_model
        from mlx_train.recipes.pretrain_jax import pretrain_jax

        metrics = pretrain_jax(cfg, run, data, model, tokenizer)
        model = load_model(metrics["saved"])  # the trained weights, for the sample below
    else:
        model = shard_model(cfg, model)  # FSDP2: train.strategy=fsdp under torchrun
        learn, lr = build_learner(cfg, data, model, run)
        train_s = fit(cfg, learn, lr, run)
        saved = save_full_model(model, run / "model", tokenizer=tokenizer.hf)
        say(f"saved {saved}")
        metrics = final_metrics(learn, started, train_s=train_s)
        metrics["saved"] = str(saved)
    if cfg.eval.samples:
        first = data.dls.valid.dataset[0][0][:8].tolist()
        out = on_rank0(model, lambda m: generate(m.eval(), first,
                                                 max_new_tokens=cfg.eval.max_new_tokens))
        say(f"sample: {tokenizer.decode(first)!r} -> {tokenizer.decode(out)!r}")
    return write_metrics(run, metrics)


__all__ = ["pretrain"]
