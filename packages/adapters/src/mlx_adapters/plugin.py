"""mlx-adapters' registrations (through the ``mlx.plugins`` entry point)."""


# the tuners, imported when first asked for: they import torch (~2 s), which `mlx --help` and
# every command that does not use an adapter method would otherwise pay at start
TUNERS = {"lora": "mlx_adapters.lora:LoraTuner", "adalora": "mlx_adapters.adalora:AdaLoraTuner",
          "ia3": "mlx_adapters.ia3:IA3Tuner",
          "prompt_tuning": "mlx_adapters.prompt_tuning:PromptTuningTuner",
          "prefix_tuning": "mlx_adapters.prefix_tuning:PrefixTuningTuner"}


def register() -> None:
    from mlx_core import registry

    for name, target in TUNERS.items():
        if name not in registry.adapter_methods:
            registry.adapter_methods.register_deferred(name, target)
    if "lora" not in registry.benchmarks:
        registry.benchmarks.register("lora", _make_bench_command())
    if "adapters" not in registry.cli_commands:
        from mlx_adapters.cli import app

        registry.cli_commands.register("adapters", app)


def _make_bench_command():
    import typer

    from mlx_core.cli import clean_errors

    @clean_errors
    def lora(model: str = typer.Option("smollm2-135m-instruct", "--model"),
             batch: int = typer.Option(4, "--batch"), seq: int = typer.Option(512, "--seq"),
             steps: int = typer.Option(3, "--steps", help="Training steps per side."),
             checkpointing: bool = typer.Option(False, "--checkpointing/--no-checkpointing",
                                                help="Gradient checkpointing on both sides."),
             checkpoint_layers: int = typer.Option(
                 -1, "--checkpoint-layers",
                 help="With --checkpointing: ours recomputes only the first N decoder layers "
                      "(-1: all, like PEFT's side)."),
             peft_tuned_allocator: bool = typer.Option(
                 False, "--peft-tuned-allocator",
                 help="Run PEFT's side with our allocator settings too (mlx_core.memory)."),
             json_path: str = typer.Option("", "--json", help="Also write the result here.")):
        """LoRA training steps: ours vs HF transformers + PEFT (time, peak memory, losses)."""
        import json

        from rich.console import Console
        from rich.table import Table

        from mlx_adapters import bench

        layers = None if checkpoint_layers < 0 else checkpoint_layers
        result = bench.run(model, batch, seq, steps, checkpointing, layers, peft_tuned_allocator)
        what = f"checkpointing={checkpointing}" + (f" (ours: first {layers} layers)"
                                                   if checkpointing and layers is not None else "")
        what += ", PEFT with our allocator settings" if peft_tuned_allocator else ""
        table = Table("side", "median step (s)", "peak RSS (MiB)", "losses",
                      title=f"mlx bench lora: {model}, {batch}x{seq}, {what}")
        for name, key in (("mlx", "mlx"), ("HF + PEFT", "hf_peft")):
            side = result[key]
            table.add_row(name, f"{side['median_step_s']:.2f}", f"{side['peak_rss_mib']:.0f}",
                          ", ".join(f"{x:.4f}" for x in side["losses"]))
        Console().print(table)
        print(f"time ratio (mlx / PEFT): {result['time_ratio']}, memory ratio: "
              f"{result['memory_ratio']}, max loss difference: {result['max_loss_difference']:.2e}")
        if json_path:
            open(json_path, "w").write(json.dumps(result, indent=2))

    return lora
