"""Training: a jitted optax step over a small functional ``TrainState``, and ``train`` around it.

The state holds the trainable parameters, the rest of the model's state (frozen), the optimizer
state and the step count; the model's structure (``graphdef``), the optimizer and the compute
dtype are static fields, so ``train_step`` compiles once per batch shape. The loss is the torch
zoo's: the mean next-token cross-entropy over labels that are not -100 (``Transformer.loss_terms``,
chunked, never building the full logits). Gradient accumulation sums the per-token losses and
their counts over micro-batches and divides once, so k micro-batches give the gradient of the
one big batch. ``compute_dtype="bfloat16"`` keeps fp32 parameters, optimizer state and
gradients, and runs the forward and backward in bf16 (the parameters are cast inside the step).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from functools import partial

import jax
import jax.numpy as jnp
import optax
from flax import nnx

IGNORE_INDEX = -100


def warmup_cosine_schedule(lr: float, steps: int, warmup: int = 0, min_lr_ratio: float = 0.0):
    """Linear warm-up from 0 to ``lr`` over ``warmup`` steps, then cosine decay to
    ``lr * min_lr_ratio`` at ``steps`` (``optax.warmup_cosine_decay_schedule``)."""
    problems = []
    if lr <= 0:
        problems.append(f"lr must be > 0 (got {lr})")
    if steps < 1:
        problems.append(f"steps must be >= 1 (got {steps})")
    if not 0 <= warmup < max(steps, 1):
        problems.append(f"warmup must be in [0, steps) = [0, {steps}) (got {warmup})")
    if not 0 <= min_lr_ratio <= 1:
        problems.append(f"min_lr_ratio must be in [0, 1] (got {min_lr_ratio})")
    if problems:
        raise ValueError("; ".join(problems))
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=lr, warmup_steps=warmup,
                                              decay_steps=steps, end_value=lr * min_lr_ratio)


def adamw(lr: float, steps: int, warmup: int = 0, *, weight_decay: float = 0.0, b1: float = 0.9,
          b2: float = 0.999, eps: float = 1e-8, min_lr_ratio: float = 0.0,
          max_grad_norm: float | None = None) -> optax.GradientTransformation:
    """AdamW (torch's defaults) over the warm-up + cosine schedule; weight decay only on tensors
    with ``ndim >= 2`` (not on norms and biases); optional global-norm gradient clipping."""
    schedule = warmup_cosine_schedule(lr, steps, warmup, min_lr_ratio)
    decay_mask = partial(jax.tree.map, lambda p: p.ndim >= 2)
    parts = [] if max_grad_norm is None else [optax.clip_by_global_norm(max_grad_norm)]
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts)


def _static(default=None):
    return dataclasses.field(default=default, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Trainable ``params``, the ``frozen`` rest of the model, ``opt_state`` and ``step``."""

    params: nnx.State
    frozen: nnx.State
    opt_state: optax.OptState
    step: jax.Array
    graphdef: nnx.GraphDef = _static()
    tx: optax.GradientTransformation = _static()
    compute_dtype: str | None = _static()

    def model(self) -> nnx.Module:
        """The model with this state's parameters (a new module; the state is not changed)."""
        return nnx.merge(self.graphdef, self.params, self.frozen)


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation, *,
                       trainable=nnx.Param, compute_dtype=None) -> TrainState:
    """Split ``model`` into the parameters ``trainable`` selects (an NNX filter: a Variable
    type such as ``nnx.Param`` or ``mlx_jax.lora.LoraParam``, a path predicate, ...) and the
    rest, and initialise ``tx`` on the trainable ones."""
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    if not jax.tree.leaves(params):
        raise ValueError(f"no parameter of this model matches trainable={trainable!r}")
    if compute_dtype is not None:
        compute_dtype = jnp.dtype(compute_dtype).name
        if not jnp.issubdtype(compute_dtype, jnp.floating):
            raise ValueError(f"compute_dtype must be a float dtype, got {compute_dtype}")
    return TrainState(params, frozen, tx.init(params), jnp.zeros((), jnp.int32), graphdef, tx,
                      compute_dtype)


def as_batch(batch) -> dict[str, jax.Array]:
    """``{"input_ids", "attention_mask", "labels"}`` from a dict with ``input_ids`` (the others
    optional) or a bare ``[B, T]`` array of ids. Missing labels are the ids, -100 where the mask
    is 0 (padding); a missing mask is all ones."""
    if not isinstance(batch, dict):
        batch = {"input_ids": batch}
    unknown = set(batch) - {"input_ids", "attention_mask", "labels"}
    if "input_ids" not in batch or unknown:
        raise ValueError("a batch is a [B, T] array of token ids or a dict with 'input_ids' and "
                         f"optionally 'attention_mask' and 'labels' (got keys {sorted(batch)})")
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
    mask = batch.get("attention_mask")
    mask = jnp.ones(ids.shape, jnp.int32) if mask is None else jnp.asarray(mask, jnp.int32)
    labels = batch.get("labels")
    labels = jnp.where(mask > 0, ids, IGNORE_INDEX) if labels is None else jnp.asarray(labels, jnp.int32)
    for name, value in (("attention_mask", mask), ("labels", labels)):
        if value.shape != ids.shape:
            raise ValueError(f"{name} has shape {value.shape}; expected {ids.shape} (input_ids')")
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _cast(tree, dtype):
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                        tree)


def _loss_terms(params, frozen, graphdef, compute_dtype, batch):
    """(sum of token losses, token count) of one (micro-)batch."""
    model = nnx.merge(graphdef, _cast(params, compute_dtype), _cast(frozen, compute_dtype))
    hidden, _ = model.model(batch["input_ids"], batch["attention_mask"])
    return model.loss_terms(hidden, batch["labels"])


def loss_and_grads(state: TrainState, batch, accum_steps: int = 1):
    """The mean loss over the batch's counted tokens, their count, and the loss's gradients in
    the trainable parameters. ``accum_steps > 1`` runs the batch as that many micro-batches
    (``lax.scan``; the batch size must divide) and gives the same numbers."""
    batch = as_batch(batch)
    size = batch["input_ids"].shape[0]
    if accum_steps < 1 or size % accum_steps:
        raise ValueError(f"accum_steps={accum_steps} must be >= 1 and divide the batch size {size}")
    terms = partial(_loss_terms, frozen=state.frozen, graphdef=state.graphdef,
                    compute_dtype=state.compute_dtype)
    grad_fn = jax.value_and_grad(lambda p, b: terms(p, batch=b), has_aux=True)
    if accum_steps == 1:
        (total, count), grads = grad_fn(state.params, batch)
    else:
        micro = jax.tree.map(lambda x: x.reshape(accum_steps, size // accum_steps, *x.shape[1:]),
                             batch)

        def add(carry, one):
            (total, count), grads = grad_fn(state.params, one)
            return jax.tree.map(jnp.add, carry, (total, count, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32),
                 jax.tree.map(jnp.zeros_like, state.params))
        (total, count, grads), _ = jax.lax.scan(add, zeros, micro)
    n = jnp.maximum(count, 1).astype(jnp.float32)  # only -100 labels: loss 0, zero gradients
    return total / n, count, jax.tree.map(lambda g: (g / n).astype(g.dtype), grads)


@partial(jax.jit, static_argnames="accum_steps")
def train_step(state: TrainState, batch, accum_steps: int = 1) -> tuple[TrainState, dict]:
    """One optimizer step; returns the new state and ``{"loss", "tokens", "grad_norm"}`` (the
    loss and gradient norm before the update)."""
    loss, count, grads = loss_and_grads(state, batch, accum_steps)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = dataclasses.replace(state, params=params, opt_state=opt_state, step=state.step + 1)
    return new, {"loss": loss, "tokens": count, "grad_norm": optax.tree.norm(grads)}


def train(model: nnx.Module, batches: Iterable, steps: int, lr: float, warmup: int = 0, *,
          weight_decay: float = 0.0, accum_steps: int = 1, compute_dtype=None,
          trainable=nnx.Param, max_grad_norm: float | None = None, min_lr_ratio: float = 0.0,
          sharder=None, on_step=None) -> list[float]:
    """Train ``model`` in place for ``steps`` optimizer steps; return the loss of each step.

    ``batches``: an iterable with at least ``steps`` batches (see ``as_batch``), each split into
    ``accum_steps`` micro-batches. AdamW over a warm-up + cosine schedule (``adamw``);
    ``trainable`` selects what is trained (``mlx_jax.lora.LoraParam``: the LoRA weights only).
    ``sharder``: a ``mlx_jax.sharding.Sharder``: the model (``shard_model``), the state and
    each batch are placed on its mesh (parameters by their logical axes, batches split over
    the data axis) before stepping; the model's parameters stay sharded afterwards.
    ``on_step(step, metrics)`` is called after each step.
    """
    if hasattr(batches, "__len__") and len(batches) < steps:
        raise ValueError(f"{len(batches)} batches for {steps} steps: pass at least `steps` batches "
                         "(e.g. repeat the list, or an endless iterator)")
    tx = adamw(lr, steps, warmup, weight_decay=weight_decay, min_lr_ratio=min_lr_ratio,
               max_grad_norm=max_grad_norm)
    if sharder is not None:
        sharder.shard_model(model)
    state = create_train_state(model, tx, trainable=trainable, compute_dtype=compute_dtype)
    if sharder is not None:
        state = sharder.shard_state(state)
    losses = []
    for i, batch in enumerate(itertools.islice(batches, steps)):
        batch = as_batch(batch)
        if sharder is not None:
            batch = sharder.shard_batch(batch)
        state, metrics = train_step(state, batch, accum_steps)
        losses.append(float(metrics["loss"]))
        if on_step is not None:
            on_step(i, metrics)
    if len(losses) < steps:
        nnx.update(model, state.params)
        raise ValueError(f"batches ran out after {len(losses)} of {steps} steps (the model keeps "
                         "those updates); pass at least `steps` batches")
    nnx.update(model, state.params)
    return losses


__all__ = ["IGNORE_INDEX", "TrainState", "adamw", "as_batch", "create_train_state",
           "loss_and_grads", "train", "train_step", "warmup_cosine_schedule"]
