"""Sharding over a Mesh with logical axis rules, on 8 CPU devices (in a subprocess: see the
``run_on_8_devices`` fixture): the sharded forward equals the unsharded one (1e-5), parameters
and logits really are split, and bad meshes and rules are refused by name. (Sharded training:
test_jax_sharding_train.py; LoRA and generation: test_jax_sharding_lora.py.)"""

import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

import mlx_jax
from mlx_core import get_preset
from mlx_jax.sharding import Sharder, make_mesh, param_axes

_SCRIPT = """
tp = Sharder(make_mesh(data=2, model=4))
for preset in ("tiny-llama", "tiny-mixtral", "tiny-gpt2"):
    plain = mlx_jax.build_model(get_preset(preset), seed=0)
    sharded = tp.shard_model(mlx_jax.build_model(get_preset(preset), seed=0))
    logits = forward(sharded, tp.shard_batch(ids), tp.shard_batch(mask))
    out[f"forward/{preset}"] = diff(logits, forward(plain, ids, mask))
    out[f"logits_spec/{preset}"] = spec(logits)
    out[f"specs/{preset}"] = {k: spec(v) for k, v in [
        ("q_proj", sharded.model.layers[0].self_attn.q_proj.weight[...]),
        ("o_proj", sharded.model.layers[0].self_attn.o_proj.weight[...]),
        ("embed", sharded.model.embed_tokens.weight[...])]}

out["seconds"] = time.perf_counter() - start
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def eight_devices(run_on_8_devices):
    return run_on_8_devices(_SCRIPT)


def test_sharded_forward_equals_unsharded(eight_devices):
    out = eight_devices
    assert out["devices"] == 8
    for preset in ("tiny-llama", "tiny-mixtral", "tiny-gpt2"):
        assert out[f"forward/{preset}"] <= 1e-5, preset
        assert out[f"logits_spec/{preset}"] == ["data", None, "model"]
    # heads and vocabulary over "model"; the hidden dimension whole (tensor parallelism)
    assert out["specs/tiny-llama"] == {"q_proj": ["model", None], "o_proj": [None, "model"],
                                       "embed": ["model", None]}


def test_one_device_mesh_runs_the_same_model():
    model = mlx_jax.build_model(get_preset("tiny-llama"))
    ids = np.array([[1, 2, 3, 4]])
    expected = np.asarray(model(ids))
    sharder = Sharder(make_mesh())
    sharder.shard_model(model)
    assert np.abs(np.asarray(nnx.jit(lambda m, x: m(x))(model, sharder.shard_batch(ids))) - expected).max() <= 1e-6


def test_bad_meshes_rules_and_names_are_refused():
    import jax

    with pytest.raises(ValueError, match="mesh axes \\['model'\\] that the mesh .* does not have"):
        Sharder(Mesh(np.array(jax.devices()[:1]), ("data",)))
    with pytest.raises(ValueError, match="needs 8 devices; there are 1 .*device_count"):
        make_mesh(data=2, model=4)
    with pytest.raises(ValueError, match="no logical axes are known for parameter 'model.mystery.weight'"):
        param_axes("model.mystery.weight")
    assert param_axes("model.layers.3.mlp.down_proj.lora_A.weight") == ("rank", "mlp")
    sharder = Sharder(make_mesh(), rules=(("batch", "data"),))
    with pytest.raises(ValueError, match="no rule for logical axis 'heads'"):
        sharder.spec(("heads", "embed"), (64, 64))
    assert sharder.spec(("batch", None), (3, 5)) == PartitionSpec("data", None)
