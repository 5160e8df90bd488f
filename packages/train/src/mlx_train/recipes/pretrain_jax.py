"""``pretrain`` with ``backend=jax``: the same run as the torch Learner's, in JAX.

Everything but the training loop is shared with the torch path: the tokenizer, the data loaders
(same rows, same shuffling), the model's initial weights (the torch zoo's init for the preset,
copied into the Flax mirror, so both backends start from one model), the optimizer settings and
the schedule. The schedule is the recipe scheduler's own (``OneCycle`` / ``FlatCos`` /
``Constant``: fastai's formulas, evaluated at each step's share of training as the Learner's
``ParamScheduler`` does) and drives AdamW's learning rate and, for 1cycle, its beta1 through
``optax.inject_hyperparams``. Weight decay skips norms and biases on both sides (here: tensors
with fewer than 2 dimensions). The loss is the zoo's, through ``mlx_jax``'s jitted
``train_step``; gradient clipping is ``optax.clip_by_global_norm``; ``train.grad_accum=k``
steps once per ``k`` batches (their gradients summed over tokens).

What a run writes matches the torch path: the rows go through the sinks of the ``logger``
config (``mlx_train.sinks``, as the Learner's logger callbacks drive them) and the console
table: the epoch rows (epoch, train_loss: the debiased moving average the Recorder keeps,
valid_loss, perplexity, time; ``history.csv``) and the step rows (loss, lr, grad_norm before
clipping, tokens_per_s, peak_mem_mib every ``logger.log_every`` optimizer steps, as
``TrainMetrics`` makes them; ``train_metrics.csv``, TensorBoard, MLflow, W&B), then
``run_dir/model`` (HF format with the tokenizer) and
``checkpoints/last.safetensors`` (here: parameters, optimizer state, step and the data
loaders' generators, in the same file the torch path uses), from which ``resume=true``
continues exactly.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mlx_train.recipes.base import RunDir, has_node, instantiate, say

MOMS = (0.95, 0.85, 0.95)  # the Learner's default (fastai's): Adam's beta1 through 1cycle


def hyper_schedules(cfg: DictConfig, lr: float, total_steps: int) -> dict[str, list[float]]:
    """The value of each scheduled hyper-parameter (``lr``, and ``mom`` for 1cycle) at every
    optimizer step, from the recipe's scheduler."""
    scheds = instantiate(cfg.scheduler).schedules(lr, MOMS)
    return {name: [float(f(step / total_steps)) for step in range(total_steps)]
            for name, f in scheds.items()}


def _optimizer(cfg: DictConfig, tables: dict[str, list[float]], max_grad_norm: float | None):
    import jax
    import jax.numpy as jnp
    import optax

    node = OmegaConf.to_container(cfg.optimizer, resolve=True)
    if node.get("_target_") != "torch.optim.AdamW":
        raise ValueError(f"backend=jax trains with AdamW (optimizer=adamw); got "
                         f"{node.get('_target_')}: choose optimizer=adamw or backend=torch")
    b1, b2 = node.get("betas", (0.9, 0.999))

    def table(values):
        values = jnp.asarray(values, jnp.float32)
        return lambda count: values[jnp.minimum(count, len(values) - 1)]

    # mask is a function of the parameters, not a schedule: static, or it would be called with the step
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=table(tables["lr"]), b1=table(tables["mom"]) if "mom" in tables else b1,
        b2=b2, eps=node.get("eps", 1e-8), weight_decay=node.get("weight_decay", 0.0),
        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
    if max_grad_norm:
        return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)
    return adamw


def _jax_model(torch_model):
    """The Flax mirror of ``torch_model`` with the same weights (fp32)."""
    from mlx_jax.loading import model_from_arrays

    arrays = {name: t.detach().float().cpu().numpy() for name, t in torch_model.state_dict().items()}
    return model_from_arrays(torch_model.config, arrays, where="the preset's initial weights")


def _batches(loader, grad_accum: int):
    """Groups of ``grad_accum`` loader batches, joined into one batch dict (numpy)."""
    group = []
    for ids, mask, labels in loader:
        group.append((ids.numpy(), mask.numpy(), labels.numpy()))
        if len(group) == grad_accum:
            yield _joined(group)
            group = []
    if group:  # a short last group steps too, as GradientAccumulation does at an epoch's end
        yield _joined(group)


def _joined(group):
    width = max(ids.shape[1] for ids, _, _ in group)

    def pad(a, value):
        return np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=value)

    ids = np.concatenate([pad(i, 0) for i, _, _ in group])
    mask = np.concatenate([pad(m, 0) for _, m, _ in group])
    labels = np.concatenate([pad(y, -100) for _, _, y in group])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, len(group)


def _loader_generators(data) -> list[torch.Generator]:
    return [g for loader in (data.dls.train, data.dls.valid) if loader is not None
            for g in getattr(loader, "generators", [])]


# -- step metrics -----------------------------------------------------------------------------
def _peak_mem_mib() -> float:
    """The accelerator's peak bytes in use where JAX reports them, else the process's peak RSS
    (as ``peak_memory_mib`` measures a CPU run)."""
    import jax

    from mlx_train.callback.train_metrics import peak_memory_mib

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else peak_memory_mib()


class StepMetrics:
    """The rows ``TrainMetrics`` makes for a Learner, from the jitted steps: every ``log_every``
    optimizer steps (None: no rows) the interval's mean loss, the lr and gradient norm (before
    clipping) of its last step, real (unmasked) tokens per second of training time, and peak
    memory, sent to ``sinks``; a last, shorter interval when training ends. The step is loader
    batches done (``train_iter``)."""

    def __init__(self, sinks, log_every: int | None, lr_table: list[float]):
        self.sinks, self.log_every, self.lr_table = sinks, log_every, lr_table
        self._reset()

    def _reset(self) -> None:
        self.losses, self.tokens, self.seconds, self.last = [], 0, 0.0, None

    def add(self, loss: float, metrics: dict, batch: dict, seconds: float, opt_step: int,
            train_iter: int, epoch: int) -> None:
        if self.log_every is None:
            return
        self.losses.append(loss)
        self.tokens += int(batch["attention_mask"].sum())
        self.seconds += seconds
        self.last = (metrics, opt_step, train_iter, epoch)
        if len(self.losses) == self.log_every:
            self.flush()

    def flush(self) -> None:
        if not self.losses:
            return
        metrics, opt_step, train_iter, epoch = self.last
        values = {"train/loss": sum(self.losses) / len(self.losses),
                  "train/lr": self.lr_table[min(opt_step, len(self.lr_table) - 1)],
                  "train/grad_norm": float(metrics["grad_norm"]),
                  "train/tokens_per_s": self.tokens / self.seconds if self.seconds > 0 else 0.0,
                  "train/peak_mem_mib": _peak_mem_mib()}
        self.sinks.log_step(train_iter, epoch, values)
        self._reset()


def _loop_sinks(cfg: DictConfig, run: RunDir, hparams: dict):
    """The console table and the sinks of the ``logger`` config's callbacks, open, and how
    often its ``TrainMetrics`` makes step rows (None: the config makes none)."""
    from rich.markup import escape

    from mlx_train.callback.loggers import SinkCallback
    from mlx_train.callback.train_metrics import TrainMetrics, describe_logs
    from mlx_train.sinks import ConsoleSink, Sinks

    loggers = instantiate(cfg.logger) if has_node(cfg, "logger") else []
    loggers = loggers if isinstance(loggers, list) else [loggers]
    source = next((cb for cb in loggers if isinstance(cb, TrainMetrics)), None)
    log_every = source.log_every if source is not None else None
    sinks = Sinks([cb.sink for cb in loggers if isinstance(cb, SinkCallback)])
    for line in describe_logs(sinks.sinks, run.path, log_every):
        say(f"logging {escape(line)}")
    sinks.sinks.insert(0, ConsoleSink())
    sinks.open(run.path, hparams)
    return sinks, log_every


def _hyperparams(cfg: DictConfig, torch_model, data, lr: float) -> dict:
    """What the sinks record at the start (as ``learner_hyperparams`` does for a Learner)."""
    return {"n_epoch": cfg.epochs, "model": type(torch_model).__name__, "backend": "jax",
            "opt": "adamw", "lr": lr, "n_params": sum(p.numel() for p in torch_model.parameters()),
            "bs": getattr(data.dls.train.dl, "batch_size", None),
            "grad_accum": int(cfg.train.grad_accum), "grad_clip": cfg.train.grad_clip}


# -- checkpoints ------------------------------------------------------------------------------
JAX_FORMAT = "mlx-train-jax-state"


def _save_checkpoint(path: Path, state, data, meta: dict) -> None:
    import jax

    from mlx_train.state import atomic_save

    leaves = jax.tree.leaves((state.params, state.opt_state, state.step))
    tensors = {f"state.{i}": torch.from_numpy(np.array(leaf)) for i, leaf in enumerate(leaves)}
    for i, g in enumerate(_loader_generators(data)):
        tensors[f"rng.loader.{i}"] = g.get_state()
    atomic_save(tensors, path, {"format": JAX_FORMAT, "version": 1, **meta})


def _load_checkpoint(path: Path, state, data):
    import dataclasses

    import jax
    import jax.numpy as jnp

    from mlx_train.state import read

    tensors, meta = read(path, JAX_FORMAT)  # a torch-backend checkpoint names its format here
    leaves, treedef = jax.tree.flatten((state.params, state.opt_state, state.step))
    if sum(k.startswith("state.") for k in tensors) != len(leaves):
        raise ValueError(f"{path} does not fit this model and optimizer (another config?); "
                         "start again without resume=true")
    restored = [jnp.asarray(tensors[f"state.{i}"].numpy(), dtype=leaf.dtype)
                for i, leaf in enumerate(leaves)]
    params, opt_state, step = jax.tree.unflatten(treedef, restored)
    for i, g in enumerate(_loader_generators(data)):
        g.set_state(tensors[f"rng.loader.{i}"])
    return dataclasses.replace(state, params=params, opt_state=opt_state, step=step), meta


# -- the run ----------------------------------------------------------------------------------
def pretrain_jax(cfg: DictConfig, run: RunDir, data, torch_model, tokenizer) -> dict:
    import jax
    from flax import nnx

    from mlx_jax import save_model
    from mlx_jax.training import create_train_state, train_step
    from mlx_train.callback.recorder import format_time

    started = time.time()
    grad_accum = int(cfg.train.grad_accum)
    if cfg.train.gradient_checkpointing:
        raise ValueError("train.gradient_checkpointing is not available with backend=jax")
    n_steps = math.ceil(len(data.dls.train) / grad_accum)
    total = cfg.epochs * n_steps
    node = OmegaConf.to_container(cfg.optimizer, resolve=True)
    lr = float(node["lr"])
    tables = hyper_schedules(cfg, lr, total)
    tx = _optimizer(cfg, tables, cfg.train.grad_clip or None)
    model = _jax_model(torch_model)
    state = create_train_state(model, tx)
    checkpoint = run.checkpoint
    start, smooth, history = 0, (0, 0.0), []
    if cfg.resume:
        state, meta = _load_checkpoint(checkpoint, state, data)
        start, smooth, history = meta["epochs_done"], tuple(meta["smooth"]), meta["history"]
        say(f"resuming {run.path} after epoch {start} of {cfg.epochs}")
        if start > cfg.epochs:
            raise ValueError(f"the checkpoint has {start} epochs done but epochs={cfg.epochs}; "
                             f"pass epochs>={start}")

    @jax.jit
    def valid_terms(params, batch):
        m = nnx.merge(state.graphdef, params, state.frozen)
        hidden, _ = m.model(batch["input_ids"], batch["attention_mask"])
        return m.loss_terms(hidden, batch["labels"])  # (sum of token losses, token count)

    sinks, log_every = _loop_sinks(cfg, run, _hyperparams(cfg, torch_model, data, lr))
    step_metrics = StepMetrics(sinks, log_every, tables["lr"])
    opt_step, train_iter = start * n_steps, start * len(data.dls.train)  # a resumed run's
    beta, (count, val) = 0.98, smooth
    try:
        for epoch in range(start, cfg.epochs):
            epoch_start, tick = time.time(), time.perf_counter()
            for batch, n_batches in _batches(data.dls.train, grad_accum):
                state, metrics = train_step(state, batch, accum_steps=1)
                loss = float(metrics["loss"])
                count, val = count + 1, beta * val + (1 - beta) * loss
                train_iter += n_batches
                step_metrics.add(loss, metrics, batch, time.perf_counter() - tick, opt_step,
                                 train_iter, epoch)
                opt_step, tick = opt_step + 1, time.perf_counter()
            train_loss = val / (1 - beta**count)
            # the Learner's AvgLoss: each batch's mean loss weighted by its number of rows
            weighted, rows = 0.0, 0
            for ids, mask, labels in data.dls.valid:
                s, n = valid_terms(state.params, {"input_ids": ids.numpy(),
                                                  "attention_mask": mask.numpy(),
                                                  "labels": labels.numpy()})
                weighted += float(s) / max(int(n), 1) * ids.shape[0]
                rows += ids.shape[0]
            valid_loss = weighted / rows
            row = {"train_loss": train_loss, "valid_loss": valid_loss,
                   "perplexity": math.exp(valid_loss),
                   "time": format_time(time.time() - epoch_start)}
            history.append({"epoch": epoch, **row})
            sinks.log_epoch(epoch, row, train_iter)  # history.csv, the trackers, the console
            if cfg.save.checkpoint_every and ((epoch + 1) % cfg.save.checkpoint_every == 0
                                              or epoch + 1 == cfg.epochs):
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                _save_checkpoint(checkpoint, state, data, {"epochs_done": epoch + 1,
                                                           "smooth": [count, val],
                                                           "history": history})
        step_metrics.flush()  # the last, shorter interval
    finally:
        sinks.close()
    nnx.update(model, state.params)
    saved = save_model(model, run / "model", tokenizer=tokenizer.hf, overwrite=True)
    say(f"saved {saved}")
    last = history[-1] if history else {}
    metrics = {k: last.get(k) for k in ("train_loss", "valid_loss", "perplexity")}
    metrics.update(epochs=len(history), backend="jax", saved=str(saved),
                   time_s=round(time.time() - started, 1))
    return metrics


__all__ = ["hyper_schedules", "pretrain_jax"]
