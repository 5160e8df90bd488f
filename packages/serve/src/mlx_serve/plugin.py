"""mlx-serve's registrations (``mlx.plugins`` entry point): ``mlx serve``, ``mlx playground``,
``mlx bench serve``, ``mlx bench quant-serve`` and the ``serve`` generation backend (``mlx
generate --backend serve`` / ``--tensor-parallel-size N``)."""


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
    if "serve" not in registry.generation_backends:
        registry.generation_backends.register("serve", _load_for_generation)


def _load_for_generation(model: str, **options):
    from mlx_serve.generation_backend import load  # the engine only when a command asks

    return load(model, **options)
