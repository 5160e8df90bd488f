"""mlx-adapters' registrations (through the ``mlx.plugins`` entry point)."""


def register() -> None:
    from mlx_adapters.ia3 import IA3Tuner
    from mlx_adapters.lora import LoraTuner
    from mlx_adapters.prompt_tuning import PromptTuningTuner
    from mlx_core import registry

    for name, tuner in (("lora", LoraTuner), ("ia3", IA3Tuner), ("prompt_tuning", PromptTuningTuner)):
        if name not in registry.adapter_methods:
            registry.adapter_methods.register(name, tuner)
    if "adapters" not in registry.cli_commands:
        from mlx_adapters.cli import app

        registry.cli_commands.register("adapters", app)
