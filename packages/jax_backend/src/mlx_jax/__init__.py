"""mlx-jax: the Flax NNX mirror of the mlx model zoo, loaded from the same HF-format weights.

``import mlx_jax`` never imports torch, and imports jax and flax only on first use of the API
below (so the ``mlx`` command line, which loads every plugin, stays fast).
``load_model(source)`` takes what ``mlx_core.load_model`` takes (a registered name such as
``smollm2-135m-instruct``, an HF-format directory, a ``.gguf`` file);
``model(input_ids, attention_mask=None)`` returns logits ``[B, T, vocab]``.
"""

__version__ = "0.1.0"

# name -> module that defines it, imported on first access
_API = {
    "KVCache": "mlx_jax.attention",
    "Transformer": "mlx_jax.transformer",
    "build_model": "mlx_jax.loading",
    "load_model": "mlx_jax.loading",
    "model_arrays": "mlx_jax.loading",
    "generate": "mlx_jax.generation",
    "stream_generate": "mlx_jax.generation",
    "save_model": "mlx_jax.saving",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    import importlib

    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'mlx_jax' has no attribute {name!r}")
