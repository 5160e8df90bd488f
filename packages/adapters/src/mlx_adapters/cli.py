"""``mlx adapters inspect|merge|methods``."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from mlx_core.cli import clean_errors

app = typer.Typer(help="Inspect and merge PEFT-format adapters.", no_args_is_help=True)
console = Console()


@app.command()
@clean_errors
def methods():
    """The adapter methods this installation provides."""
    from mlx_core import registry

    table = Table("method", "config")
    for name, tuner in registry.adapter_methods.items():
        table.add_row(name, tuner.config_class.__name__)
    console.print(table)


@app.command()
@clean_errors
def inspect(directory: Path = typer.Argument(..., help="A PEFT adapter directory.")):
    """Method, targets, rank and parameter count of a saved adapter."""
    from safetensors import safe_open

    from mlx_adapters.config import load_config
    from mlx_core.peft_rules import KEY_PREFIX, WEIGHTS_NAME

    config = load_config(directory)
    with safe_open(directory / WEIGHTS_NAME, "np") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    modules = sorted({k.rsplit(".lora_", 1)[0].removeprefix(KEY_PREFIX) for k in shapes})
    table = Table("field", "value", title=str(directory))
    table.add_row("method", config.peft_type)
    table.add_row("target_modules", str(config.target_modules))
    fields = ("init_r", "target_r", "lora_alpha") if config.peft_type == "ADALORA" else \
        ("r", "lora_alpha", "lora_dropout", "use_rslora", "num_virtual_tokens", "prefix_projection")
    for field in fields:
        if hasattr(config, field):
            table.add_row(field, str(getattr(config, field)))
    table.add_row("base model", str(config.base_model_name_or_path))
    table.add_row("wrapped modules", f"{len(modules)} (e.g. {modules[0] if modules else '-'})")
    count = sum(math.prod(s) for s in shapes.values())
    table.add_row("parameters", f"{count:,}")
    console.print(table)


@app.command()
@clean_errors
def merge(base: str = typer.Argument(..., help="The base model: a name, HF directory or .gguf."),
          adapter: Path = typer.Argument(..., help="A PEFT adapter directory."),
          out: Path = typer.Argument(..., help="Where to write the merged HF-format model."),
          overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists.")):
    """Fold ADAPTER into BASE and write an HF-format model directory."""
    from mlx_core import require_torch

    require_torch("mlx adapters merge")
    from mlx_adapters.peft_model import PeftModel
    from mlx_core import load_model, save_model

    model = load_model(base)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    save_model(merged, out, overwrite=overwrite)
    typer.echo(out)
