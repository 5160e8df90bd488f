"""Training runs: optax AdamW + warm-up/cosine follows torch's AdamW + the same schedule step for
step (losses within 1e-5); bf16 compute keeps fp32 parameters; trained weights cross over to the
torch zoo through the HF format, both ways (logits within 1e-4)."""

import copy

import jax
import numpy as np
import torch
from flax import nnx

import mlx_core
import mlx_jax
from mlx_jax.training import (
    adamw,
    create_train_state,
    loss_and_grads,
    train,
    warmup_cosine_schedule,
)

_grads = jax.jit(loss_and_grads, static_argnums=2)


def test_bf16_compute_keeps_fp32_parameters(tiny_pair, lm_batch):
    _, directory, _ = tiny_pair("tiny-llama")
    model = mlx_jax.load_model(directory)
    batch = lm_batch()
    loss32 = float(nnx.jit(lambda m, b: m(**b))(model, batch))
    bf16 = create_train_state(model, adamw(1e-3, 10), compute_dtype="bfloat16")
    loss16, _, grads16 = _grads(bf16, batch, 1)
    assert 0 < abs(float(loss16) - loss32) <= 0.05  # computed in bf16, not fp32
    assert {str(g.dtype) for g in jax.tree.leaves(grads16)} == {"float32"}
    losses = train(model, [batch] * 6, steps=6, lr=1e-2, warmup=1, compute_dtype="bfloat16")
    assert losses[0] == float(loss16) and losses[-1] < losses[0] - 0.1
    assert {str(v.dtype) for v in mlx_jax.model_arrays(model).values()} == {"float32"}


def _torch_train(model, batches, lr, warmup, steps, weight_decay):
    """The reference loop: torch AdamW (decay on ndim >= 2) + the same warm-up/cosine schedule."""
    params = [p for p in model.parameters()]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr)
    schedule = warmup_cosine_schedule(lr, steps, warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: float(schedule(i)) / lr)
    losses = []
    for batch in batches:
        loss = model(**{k: torch.tensor(v) for k, v in batch.items()})
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def test_adamw_steps_follow_torch_and_torch_trained_weights_load_in_jax(tiny_pair, tmp_path, lm_batch):
    torch_model, directory, _ = tiny_pair("tiny-llama")
    torch_model = copy.deepcopy(torch_model).train()
    batches = [lm_batch(seed=s) for s in range(4)]
    options = dict(lr=3e-3, warmup=1, steps=4, weight_decay=0.1)
    ref = _torch_train(torch_model, batches, **options)
    model = mlx_jax.load_model(directory)
    losses = train(model, batches, **options)
    assert np.abs(np.array(losses) - ref).max() <= 1e-5
    # torch -> HF directory -> JAX: the same logits (and JAX's own trained weights agree too)
    loaded = mlx_jax.load_model(mlx_core.save_model(torch_model, tmp_path / "torch-trained"))
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        expected = torch_model(torch.tensor(ids)).numpy()
    forward = nnx.jit(lambda m, x: m(x))
    assert np.abs(np.asarray(forward(loaded, ids)) - expected).max() <= 1e-4
    assert np.abs(np.asarray(forward(model, ids)) - expected).max() <= 1e-4


def test_jax_trained_weights_load_in_torch(tiny_pair, tmp_path, lm_batch):
    _, directory, _ = tiny_pair("tiny-qwen2")
    model = mlx_jax.load_model(directory)
    ids = lm_batch()["input_ids"]
    before = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))
    losses = train(model, [lm_batch(seed=s) for s in range(3)], steps=3, lr=1e-2, accum_steps=2)
    saved = mlx_jax.save_model(model, tmp_path / "jax-trained")
    after = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))
    assert np.abs(after - before).max() > 1e-2 and len(losses) == 3  # it did train
    with torch.no_grad():
        expected = mlx_core.load_model(saved)(torch.tensor(ids)).numpy()
    assert np.abs(after - expected).max() <= 1e-4


