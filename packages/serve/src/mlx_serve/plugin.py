"""mlx-serve's registrations (``mlx.plugins`` entry point): the ``mlx serve`` command."""


def register() -> None:
    from mlx_core import registry

    if "serve" not in registry.cli_commands:
        from mlx_serve.cli import serve

        registry.cli_commands.register("serve", serve)
