"""mlx-jax: the Flax NNX mirror of the mlx model zoo, loaded from the same HF-format weights.

``import mlx_jax`` never imports torch, and imports jax and flax only on first use of the API
below (so the ``mlx`` command line, which loads every plugin, stays fast).
``load_model(source)`` takes what ``mlx_core.load_model`` takes (a registered name such as
``smollm2-135m-instruct``, an HF-format directory, a ``.gguf`` file);
``model(input_ids, attention_mask=None)`` returns logits ``[B, T, vocab]``.
Training (``train``, ``train_step``: optax AdamW, gradient accumulation, bf16 compute), LoRA in
PEFT's format (``load_lora``, ``apply_lora``, ``merge_lora``, ``save_lora``) and sharding over a
mesh (``Sharder``, ``make_mesh``) are in ``mlx_jax.training``, ``mlx_jax.lora`` and
``mlx_jax.sharding``.
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
    "TrainState": "mlx_jax.training",
    "adamw": "mlx_jax.training",
    "create_train_state": "mlx_jax.training",
    "train": "mlx_jax.training",
    "train_step": "mlx_jax.training",
    "LoraConfig": "mlx_jax.lora",
    "apply_lora": "mlx_jax.lora",
    "load_lora": "mlx_jax.lora",
    "merge_lora": "mlx_jax.lora",
    "save_lora": "mlx_jax.lora",
    "Sharder": "mlx_jax.sharding",
    "make_mesh": "mlx_jax.sharding",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    import importlib

    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'mlx_jax' has no attribute {name!r}")
