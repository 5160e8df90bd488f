"""mlx-jax's registrations: the Flax ``Transformer`` as backend ``flax`` of every zoo architecture.

Registering imports neither jax nor flax: the builder imports them when a model is built.
"""

from __future__ import annotations

from mlx_core import registry
from mlx_core.config import HF_MODEL_TYPES


def _flax_transformer(config, **options):
    from mlx_jax.transformer import Transformer

    return Transformer(config, **options)


def register() -> None:
    for model_type in HF_MODEL_TYPES:
        if model_type not in registry.architectures or "flax" not in registry.architectures.get(model_type):
            registry.register_architecture(model_type, "flax", _flax_transformer)
