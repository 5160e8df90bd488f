"""mlx-jax's registrations: the Flax ``Transformer`` as backend ``flax`` of every zoo
architecture, generation backend ``jax`` (``mlx generate/chat --backend jax``) and
``mlx bench jax``.

Registering imports neither jax nor flax (nor torch): the builder imports them when a model is
built, the benchmark when it runs.
"""

from __future__ import annotations

from mlx_core import registry
from mlx_core.config import HF_MODEL_TYPES


def _flax_transformer(config, **options):
    from mlx_jax.transformer import Transformer

    return Transformer(config, **options)


def _load_for_generation(source):
    """(the Flax model, its jitted ``stream_generate``) for ``mlx generate/chat --backend jax``."""
    from mlx_jax.generation import stream_generate  # imports jax and flax
    from mlx_jax.loading import load_model

    return load_model(source), stream_generate


def register() -> None:
    if "jax" not in registry.generation_backends:
        registry.generation_backends.register("jax", _load_for_generation)
    for model_type in HF_MODEL_TYPES:
        if model_type not in registry.architectures or "flax" not in registry.architectures.get(model_type):
            registry.register_architecture(model_type, "flax", _flax_transformer)
    if "jax" not in registry.benchmarks:
        registry.benchmarks.register("jax", _make_bench_command())


def _make_bench_command():
    import typer

    from mlx_core.cli import clean_errors

    @clean_errors
    def jax(model: str = typer.Option("smollm2-135m-instruct", "--model", "-m"),
            batch: int = typer.Option(1, "--batch"),
            seq: int = typer.Option(128, "--seq", help="Tokens per row (forward) / prompt length."),
            new_tokens: int = typer.Option(32, "--new-tokens", help="Greedy tokens to generate."),
            repeats: int = typer.Option(5, "--repeats", help="Timed runs per side (median)."),
            quick: bool = typer.Option(False, "--quick",
                                       help="A tiny random model and small inputs (seconds)."),
            json_path: str = typer.Option("", "--json", help="Also write the result here.")):
        """mlx-jax (jit) vs the torch zoo (eager): forward and greedy-decode tokens/s, as ratios."""
        import json

        from mlx_jax import bench

        result = bench.run(model, quick=quick, batch=batch, seq=seq, new_tokens=new_tokens,
                           repeats=repeats)
        typer.echo(bench.report(result))
        if json_path:
            with open(json_path, "w") as f:
                f.write(json.dumps(result, indent=2))

    return jax
