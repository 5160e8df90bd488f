"""mlx_jax.save_model writes HF-format directories the torch zoo loads to the same logits
(max |difference| <= 1e-4, fp32), and bf16 parameters stay bf16 on disk."""

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open

import mlx_core
import mlx_jax
from mlx_core import get_preset


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-mixtral", "tiny-qwen2"])
def test_flax_model_saved_loads_in_torch_to_the_same_logits(preset, tmp_path):
    model = mlx_jax.build_model(get_preset(preset), seed=1)
    directory = mlx_jax.save_model(model, tmp_path / "saved")
    torch_model = mlx_core.load_model(directory)
    ids = np.random.RandomState(1).randint(0, 128, (2, 11))
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids)).numpy()
    assert np.abs(np.asarray(nnx.jit(lambda m, x: m(x))(model, ids)) - ref).max() <= 1e-4
    with pytest.raises(FileExistsError):
        mlx_jax.save_model(model, directory)


def test_bf16_parameters_round_trip_exactly(tiny_pair, tmp_path):
    _, directory, _ = tiny_pair("tiny-llama")
    half = mlx_jax.load_model(directory, dtype="bfloat16")
    again = mlx_jax.load_model(mlx_jax.save_model(half, tmp_path / "bf16"), dtype="bfloat16")
    saved, loaded = mlx_jax.model_arrays(half), mlx_jax.model_arrays(again)
    assert all(np.array_equal(saved[k], loaded[k]) for k in saved)
    with safe_open(tmp_path / "bf16" / "model.safetensors", framework="numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
