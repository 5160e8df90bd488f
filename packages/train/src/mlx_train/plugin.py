"""mlx-train's registrations (through the ``mlx.plugins`` entry point): the recipes, the
``mlx recipes``, ``mlx train``, ``mlx tune`` and ``mlx quickstart`` commands, and
``mlx bench learner``."""


def register() -> None:
    from mlx_core import registry
    from mlx_train import cli, recipes

    recipes.register()
    for name, command in (("recipes", cli.recipes_app), ("train", cli.train),
                          ("tune", cli.tune_app), ("quickstart", cli.quickstart)):
        if name not in registry.cli_commands:
            registry.cli_commands.register(name, command)
    if "learner" not in registry.benchmarks:
        from mlx_train.bench import bench_learner

        registry.benchmarks.register("learner", bench_learner)
