"""mlx-serve's registrations (``mlx.plugins`` entry point): ``mlx serve``, ``mlx playground``,
``mlx bench serve`` and ``mlx bench quant-serve``."""


def register() -> None:
    from mlx_core import registry

    if "serve" not in registry.cli_commands:
        from mlx_serve.cli import serve

        registry.cli_commands.register("serve", serve)
    if "playground" not in registry.cli_commands:
        from mlx_serve.cli import playground

        registry.cli_commands.register("playground", playground)
    if "serve" not in registry.benchmarks:
        from mlx_serve.cli import bench_serve

        registry.benchmarks.register("serve", bench_serve)
    if "quant-serve" not in registry.benchmarks:
        from mlx_serve.cli import bench_quant_serve

        registry.benchmarks.register("quant-serve", bench_quant_serve)
