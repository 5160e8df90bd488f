"""Shared fixtures: torch zoo models and their mlx_jax twins, each built and saved once."""

import pytest

TINY_PRESETS = ["tiny-llama", "tiny-llama3", "tiny-mistral", "tiny-qwen2", "tiny-qwen3",
                "tiny-olmo2", "tiny-phi3", "tiny-llama-dynamic-rope", "tiny-phi3-longrope",
                "tiny-gemma2", "tiny-gemma3", "tiny-mixtral",
                "tiny-qwen3-moe", "tiny-gpt2", "tiny-deepseek-v2", "tiny-deepseek-v3"]


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """``tiny_pair(preset)`` -> (torch model, its HF directory, mlx_jax model loaded from it)."""
    import torch

    import mlx_jax
    from mlx_core import build_model, get_preset, save_model

    built = {}

    def get(preset: str):
        if preset not in built:
            torch.manual_seed(0)
            torch_model = build_model(get_preset(preset)).eval()
            directory = save_model(torch_model, tmp_path_factory.mktemp(preset) / "model")
            built[preset] = (torch_model, directory, mlx_jax.load_model(directory))
        return built[preset]

    return get


@pytest.fixture(scope="session")
def builtin_pair(builtin_model_dir):
    """(torch model, mlx_jax model, tokenizer) of the built-in smollm2-135m-instruct."""
    import mlx_core
    import mlx_jax

    return (mlx_core.load_model(builtin_model_dir), mlx_jax.load_model(builtin_model_dir),
            mlx_core.load_tokenizer(builtin_model_dir))


@pytest.fixture(scope="session")
def lm_batch():
    """``lm_batch(vocab=128, batch=4, length=12, seed=0)`` -> a training batch (numpy dict)."""
    import numpy as np

    def make(vocab=128, batch=4, length=12, seed=0):
        """Rows of different lengths (right padding, labels -100 there), one label masked inside."""
        rng = np.random.RandomState(seed)
        ids = rng.randint(0, vocab, (batch, length))
        mask = np.ones((batch, length), np.int64)
        for row, pad in enumerate([0, 5, 2, 8][:batch]):
            mask[row, length - pad:] = 0
        labels = np.where(mask > 0, ids, -100)
        labels[0, 4] = -100  # e.g. a prompt token
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return make


# What the 8-device sharding scripts (run by ``run_on_8_devices``) start with.
SHARDING_PRELUDE = """
import json, time
import jax, numpy as np
from flax import nnx
import mlx_jax
from mlx_core import get_preset
from mlx_jax import lora
from mlx_jax.sharding import FSDP_RULES, Sharder, make_mesh
from mlx_jax.training import adamw, create_train_state, train, train_step

def spec(x):  # the PartitionSpec as a full-length list
    entries = list(x.sharding.spec)
    return entries + [None] * (x.ndim - len(entries))

def diff(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

start = time.perf_counter()
out = {"devices": len(jax.devices())}
rng = np.random.RandomState(0)
ids = rng.randint(0, 128, (4, 12))
mask = np.ones_like(ids)
mask[1, :3] = 0  # left padding
batch = {"input_ids": ids, "attention_mask": mask}
forward = nnx.jit(lambda m, ids, mask: m(ids, mask))
"""


@pytest.fixture(scope="session")
def run_on_8_devices():
    """``run_on_8_devices(code)`` runs ``SHARDING_PRELUDE + code`` in a subprocess with 8 CPU
    devices (XLA_FLAGS must be set before jax is imported, and this process has imported it)
    and returns the JSON object the code prints on its last line."""
    import json
    import os
    import subprocess
    import sys

    def run(code: str) -> dict:
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
        done = subprocess.run([sys.executable, "-c", SHARDING_PRELUDE + code], capture_output=True,
                              text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    return run


def pytest_generate_tests(metafunc):
    """A test taking ``tiny_preset`` runs once per tiny preset, i.e. per family and code path."""
    if "tiny_preset" in metafunc.fixturenames:
        metafunc.parametrize("tiny_preset", TINY_PRESETS)
