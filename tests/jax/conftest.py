"""Shared fixtures: torch zoo models and their mlx_jax twins, each built and saved once."""

import pytest

TINY_PRESETS = ["tiny-llama", "tiny-llama3", "tiny-mistral", "tiny-qwen2", "tiny-mixtral", "tiny-gpt2"]


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


def pytest_generate_tests(metafunc):
    """A test taking ``tiny_preset`` runs once per tiny preset, i.e. per family and code path."""
    if "tiny_preset" in metafunc.fixturenames:
        metafunc.parametrize("tiny_preset", TINY_PRESETS)
