"""mlx_jax.load_model: every source mlx_core reads, strict name/shape checks, torch-free IO."""

import json
import shutil

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch_file

import mlx_jax
from mlx_core import build_model, get_preset, save_model
from mlx_core.checkpoint_numpy import read_safetensors_numpy
from mlx_core.registry import UnknownNameError


def _copy(directory, tmp_path, edit):
    """A copy of an HF directory whose tensors went through ``edit(dict) -> dict``."""
    out = tmp_path / "edited"
    shutil.copytree(directory, out)
    tensors = edit(load_file(out / "model.safetensors"))
    save_file(tensors, out / "model.safetensors")
    return out


def test_missing_unexpected_and_misshaped_tensors_are_named(tiny_pair, tmp_path):
    _, directory, _ = tiny_pair("tiny-llama")
    name = "model.layers.1.mlp.up_proj.weight"

    def drop(t):
        return {k: v for k, v in t.items() if k != name}

    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\).*up_proj") as e:
        mlx_jax.load_model(_copy(directory, tmp_path / "a", drop))
    assert "do not match its config.json" in str(e.value)
    with pytest.raises(ValueError, match=r"unexpected 1 tensor\(s\).*extra\.weight"):
        mlx_jax.load_model(_copy(directory, tmp_path / "b", lambda t: {**t, "extra.weight": t[name]}))
    with pytest.raises(ValueError, match=rf"tensor {name} .* has shape \(96, 63\).*expects \(96, 64\)"):
        mlx_jax.load_model(_copy(directory, tmp_path / "c", lambda t: {**t, name: t[name][:, :63]}))


def test_sharded_checkpoint_and_bf16_dtype(tiny_pair, tmp_path):
    torch_model, directory, reference = tiny_pair("tiny-qwen2")
    sharded = save_model(torch_model, tmp_path / "sharded", max_shard_size=40_000)
    assert len(list(sharded.glob("*.safetensors"))) > 1
    loaded = mlx_jax.model_arrays(mlx_jax.load_model(sharded))
    expected = mlx_jax.model_arrays(reference)
    assert loaded.keys() == expected.keys()
    assert all(np.array_equal(loaded[k], expected[k]) for k in expected)
    half = mlx_jax.load_model(directory, dtype="bfloat16")
    assert {str(v.dtype) for v in mlx_jax.model_arrays(half).values()} == {"bfloat16"}
    assert str(nnx.jit(lambda m, x: m(x))(half, np.array([[1, 2, 3]])).dtype) == "bfloat16"


def test_bf16_safetensors_are_widened_exactly(tmp_path):
    t = torch.randn(5, 7).to(torch.bfloat16)
    save_torch_file({"w": t, "i": torch.arange(4)}, tmp_path / "model.safetensors")
    arrays = read_safetensors_numpy(tmp_path)
    assert arrays["w"].dtype == np.float32
    np.testing.assert_array_equal(arrays["w"], t.float().numpy())
    np.testing.assert_array_equal(arrays["i"], np.arange(4))


def test_hf_gpt2_names_without_prefix_load(tiny_pair, tmp_path):
    # GPT2Model (no LM head) saves "h.0.attn.c_attn.weight": the prefix is added on load.
    _, directory, reference = tiny_pair("tiny-gpt2")
    out = _copy(directory, tmp_path, lambda t: {k.removeprefix("transformer."): v for k, v in t.items()})
    loaded = mlx_jax.model_arrays(mlx_jax.load_model(out))
    assert all(np.array_equal(v, loaded[k]) for k, v in mlx_jax.model_arrays(reference).items())


def test_bad_sources_say_what_was_expected(tmp_path):
    with pytest.raises(UnknownNameError, match="smollm2-135m-instruct"):
        mlx_jax.load_model("smollm2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        mlx_jax.load_model(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(get_preset("tiny-llama").to_hf_config()))
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        mlx_jax.load_model(tmp_path / "empty")


def test_random_init_is_the_zoo_init(tmp_path):
    model = mlx_jax.build_model(get_preset("tiny-llama"), seed=0)
    arrays = mlx_jax.model_arrays(model)
    assert set(arrays) == set(build_model(get_preset("tiny-llama")).state_dict())
    assert abs(arrays["model.embed_tokens.weight"].std() - 0.02) < 2e-3
    assert (arrays["model.norm.weight"] == 1).all()
