"""mlx-core's own registrations, loaded through the ``mlx.plugins`` entry point like any other."""

from __future__ import annotations

from mlx_core import registry
from mlx_core.config import HF_MODEL_TYPES


def _torch_transformer(config):
    from mlx_core.models.transformer import Transformer  # torch only when a model is built

    return Transformer(config)


def register() -> None:
    import mlx_core.presets  # noqa: F401  (fills registry.presets)
    import mlx_core.sources  # noqa: F401  (fills registry.model_sources)
    from mlx_core.cli import doctor, generate, models

    for name, command in (("models", models.app), ("generate", generate.generate),
                          ("chat", generate.chat), ("doctor", doctor.doctor)):
        if name not in registry.cli_commands:
            registry.cli_commands.register(name, command)
    if "quant" not in registry.benchmarks:
        registry.benchmarks.register("quant", generate.bench_quant)
    for model_type in HF_MODEL_TYPES:
        if model_type not in registry.architectures or "torch" not in registry.architectures.get(model_type):
            registry.register_architecture(model_type, "torch", _torch_transformer)
