"""mlx-train's registrations (through the ``mlx.plugins`` entry point): the recipes, the
``mlx recipes``, ``mlx train``, ``mlx tune``, ``mlx quickstart`` and ``mlx eval`` commands,
and the ``mlx bench learner`` and ``mlx bench sweep`` benchmarks."""


def register() -> None:
    from mlx_core import registry
    from mlx_train import cli, recipes
    from mlx_train.lm_eval.cli import eval_command  # imports lm_eval only when it runs

    recipes.register()
    for name, command in (("recipes", cli.recipes_app), ("train", cli.train),
                          ("tune", cli.tune_app), ("quickstart", cli.quickstart),
                          ("eval", eval_command)):
        if name not in registry.cli_commands:
            registry.cli_commands.register(name, command)
    if "learner" not in registry.benchmarks:
        registry.benchmarks.register("learner", cli.bench_learner)
    if "sweep" not in registry.benchmarks:
        from mlx_train.bench_sweep import bench_sweep

        registry.benchmarks.register("sweep", bench_sweep)
