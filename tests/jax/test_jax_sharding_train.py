"""Sharded training on 8 CPU devices (in a subprocess: see the ``run_on_8_devices`` fixture):
train steps with tensor-parallel and FSDP rules equal the unsharded ones (losses, gradient norms
and parameters within 1e-5); parameters and Adam's moments really are split."""

import json

import pytest

_SCRIPT = """
tp = Sharder(make_mesh(data=2, model=4))
for name, rules in (("tp", tp.rules), ("fsdp", FSDP_RULES)):
    sharder = Sharder(tp.mesh, rules)
    plain = mlx_jax.build_model(get_preset("tiny-llama"), seed=0)
    sharded = sharder.shard_model(mlx_jax.build_model(get_preset("tiny-llama"), seed=0))
    s0 = create_train_state(plain, adamw(1e-3, 4))
    s1 = sharder.shard_state(create_train_state(sharded, adamw(1e-3, 4)))
    losses = []
    for _ in range(2):
        s0, m0 = train_step(s0, batch, 2)
        s1, m1 = train_step(s1, sharder.shard_batch(batch), 2)
        losses.append(abs(float(m0["loss"]) - float(m1["loss"])))
        losses.append(abs(float(m0["grad_norm"]) - float(m1["grad_norm"])))
    out[f"losses/{name}"] = max(losses)
    out[f"params/{name}"] = diff(s0.params, s1.params)
    out[f"q_proj_spec/{name}"] = spec(s1.params["model"]["layers"][0]["self_attn"]["q_proj"]["weight"][...])
    out[f"adam_mu_specs/{name}"] = sorted({json.dumps(spec(x)) for x in jax.tree.leaves(s1.opt_state)})

out["seconds"] = time.perf_counter() - start
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def eight_devices(run_on_8_devices):
    return run_on_8_devices(_SCRIPT)


@pytest.mark.parametrize("rules", ["tp", "fsdp"])  # each step: 2 micro-batches
def test_sharded_train_steps_equal_unsharded(eight_devices, rules):
    out = eight_devices
    assert out[f"losses/{rules}"] <= 1e-5  # losses and gradient norms of two steps
    assert out[f"params/{rules}"] <= 1e-5
    expected = {"tp": ["model", None], "fsdp": ["model", "data"]}[rules]
    assert out[f"q_proj_spec/{rules}"] == expected
    assert json.dumps(expected) in out[f"adam_mu_specs/{rules}"]  # Adam's moments sharded like it
