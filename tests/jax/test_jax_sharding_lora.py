"""Sharded LoRA training and generation on 8 CPU devices (in a subprocess: see the
``run_on_8_devices`` fixture): equal to the unsharded ones (1e-5; the same greedy tokens), with
the LoRA weights split like their base layers."""

import numpy as np
import pytest

_SCRIPT = """
tp = Sharder(make_mesh(data=2, model=4))
models = []
for sharder in (None, tp):
    model = mlx_jax.build_model(get_preset("tiny-llama"), seed=0)
    lora.apply_lora(model, lora.LoraConfig(target_modules=["q_proj", "down_proj"], r=4,
                                           init_lora_weights="gaussian"))
    out.setdefault("lora_losses", []).append(
        train(model, [batch] * 3, steps=3, lr=1e-3, trainable=lora.LoraParam, sharder=sharder))
    models.append(model)
out["lora_params"] = diff(nnx.state(models[0], lora.LoraParam), nnx.state(models[1], lora.LoraParam))
out["lora_b_spec"] = spec(models[1].model.layers[0].self_attn.q_proj.lora_B.weight[...])
out["generate"] = [mlx_jax.generate(m, [[1, 2, 3], [4, 5]], max_new_tokens=6, stop_token_ids=[])
                   for m in models]
out["seconds"] = time.perf_counter() - start
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def eight_devices(run_on_8_devices):
    return run_on_8_devices(_SCRIPT)


def test_sharded_lora_training_equals_unsharded(eight_devices):
    out = eight_devices
    plain, sharded = out["lora_losses"]
    assert np.abs(np.array(plain) - sharded).max() <= 1e-5 and plain[-1] < plain[0]
    assert out["lora_params"] <= 1e-5
    assert out["lora_b_spec"] == ["model", None]  # B [out, r] follows q_proj




def test_sharded_generation_equals_unsharded(eight_devices):
    plain, sharded = eight_devices["generate"]
    assert plain == sharded and len(plain[0]) == 6
