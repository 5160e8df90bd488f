"""Training in JAX: the loss and its gradients equal the torch zoo's loss and autograd gradients
(1e-5, fp32); k micro-batches equal one big batch (1e-6); the schedule; input checks.
(Training runs, bf16 compute and checkpoints across frameworks: test_jax_train_runs.py.)"""

import copy
import math

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from mlx_jax.loading import param_name
from mlx_jax.training import (
    adamw,
    as_batch,
    create_train_state,
    loss_and_grads,
    train,
    train_step,
    warmup_cosine_schedule,
)

_grads = jax.jit(loss_and_grads, static_argnums=2)


def _flat(state) -> dict[str, np.ndarray]:
    return {param_name(path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-olmo2", "tiny-gemma2", "tiny-gemma3",
                                    "tiny-gpt2", "tiny-mixtral", "tiny-qwen3-moe"])
def test_loss_and_gradients_equal_torch_autograd(tiny_pair, preset, lm_batch):
    torch_model, _, jax_model = tiny_pair(preset)
    torch_model = copy.deepcopy(torch_model)  # the fixture's model is shared: keep it grad-free
    batch = lm_batch()
    loss = torch_model(**{k: torch.tensor(v) for k, v in batch.items()})
    loss.backward()
    expected = {name: p.grad.numpy() for name, p in torch_model.named_parameters()}
    state = create_train_state(jax_model, adamw(1e-3, 10))
    jax_loss, count, grads = _grads(state, batch, 1)
    assert int(count) == (batch["labels"][:, 1:] != -100).sum()
    assert abs(float(jax_loss) - loss.item()) <= 1e-5
    assert _max_diff(_flat(grads), expected) <= 1e-5
    # model(ids, mask, labels) is the same loss, as in the torch zoo
    assert abs(float(jax_model(*batch.values())) - loss.item()) <= 1e-5


def test_micro_batches_equal_one_big_batch(tiny_pair, lm_batch):
    _, _, model = tiny_pair("tiny-llama")
    batch = lm_batch(batch=4)  # token counts per row differ: a mean of means would not match
    state = create_train_state(model, adamw(1e-3, 10))
    whole, count, grads = _grads(state, batch, 1)
    loss, count_k, grads_k = _grads(state, batch, 4)
    assert int(count_k) == int(count)
    assert abs(float(loss) - float(whole)) <= 1e-6
    assert _max_diff(_flat(grads_k), _flat(grads)) <= 1e-6
    with pytest.raises(ValueError, match="accum_steps=3 must be >= 1 and divide the batch size 4"):
        train_step(state, batch, accum_steps=3)


def test_schedule_is_linear_warmup_then_cosine():
    schedule = warmup_cosine_schedule(1e-3, steps=10, warmup=2, min_lr_ratio=0.1)
    lrs = [float(schedule(i)) for i in range(11)]
    assert lrs[0] == 0 and np.allclose(lrs[1:3], [5e-4, 1e-3], rtol=1e-6)
    cosine = [1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * (i - 2) / 8)) for i in range(2, 11)]
    assert np.allclose(lrs[2:], cosine, rtol=1e-5)
    with pytest.raises(ValueError, match=r"warmup must be in \[0, steps\)"):
        warmup_cosine_schedule(1e-3, steps=5, warmup=5)
    with pytest.raises(ValueError, match="lr must be > 0"):
        adamw(0.0, steps=5)


def test_bad_batches_and_options_are_named(tiny_pair, lm_batch):
    _, _, model = tiny_pair("tiny-llama")
    with pytest.raises(ValueError, match="dict with 'input_ids'"):
        as_batch({"ids": np.zeros((1, 4))})
    with pytest.raises(ValueError, match=r"labels has shape \(1, 3\); expected \(1, 4\)"):
        as_batch({"input_ids": np.zeros((1, 4)), "labels": np.zeros((1, 3))})
    with pytest.raises(ValueError, match="no parameter of this model matches"):
        create_train_state(model, adamw(1e-3, 2), trainable=nnx.BatchStat)
    with pytest.raises(ValueError, match="2 batches for 3 steps"):
        train(model, [lm_batch()] * 2, steps=3, lr=1e-3)  # refused before any step
