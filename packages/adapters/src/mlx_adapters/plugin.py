"""mlx-adapters' registrations (through the ``mlx.plugins`` entry point)."""


def register() -> None:
    from mlx_adapters.lora import LoraTuner
    from mlx_core import registry

    if "lora" not in registry.adapter_methods:
        registry.adapter_methods.register("lora", LoraTuner)
    if "adapters" not in registry.cli_commands:
        from mlx_adapters.cli import app

        registry.cli_commands.register("adapters", app)
