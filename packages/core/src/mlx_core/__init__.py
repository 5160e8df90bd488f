"""mlx-core: configs, registries, checkpoint IO, model sources, tokenizers, the torch model zoo.

``import mlx_core`` never imports torch: the torch API (``load_model``, ``save_model``,
``generate``, ``Transformer``) is loaded on first use and needs ``pip install 'mlx-core[torch]'``.
"""

from mlx_core.config import ModelConfig
from mlx_core.registry import Registry, UnknownNameError

__version__ = "0.1.0"

# name -> module that defines it; loaded lazily because they need torch
_TORCH_API = {
    "load_model": "mlx_core.models.loading",
    "build_model": "mlx_core.models.loading",
    "save_model": "mlx_core.models.loading",
    "Transformer": "mlx_core.models.transformer",
    "generate": "mlx_core.models.generation",
    "stream_generate": "mlx_core.models.generation",
    "prepack_linear_weights": "mlx_core.transforms.fast_linear",
    "quantize": "mlx_core.transforms.quantize",
}
_LAZY = {
    "load_tokenizer": "mlx_core.tokenizer",
    "Tokenizer": "mlx_core.tokenizer",
    "resolve_model_dir": "mlx_core.sources",
    "get_preset": "mlx_core.presets",
}

__all__ = ["ModelConfig", "Registry", "UnknownNameError", *_TORCH_API, *_LAZY]


def require_torch(feature: str):
    """Import torch, or explain which extra to install."""
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{feature} needs torch: install it with  pip install 'mlx-core[torch]'"
        ) from None
    return torch


def __getattr__(name: str):
    import importlib

    if name in _TORCH_API:
        require_torch(f"mlx_core.{name}")
        return getattr(importlib.import_module(_TORCH_API[name]), name)
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mlx_core' has no attribute {name!r}")
