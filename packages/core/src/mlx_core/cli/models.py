"""``mlx models list|pull|info|convert``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from mlx_core import registry
from mlx_core.cli.errors import clean_errors
from mlx_core.config import ModelConfig
from mlx_core.registry import UnknownNameError

app = typer.Typer(help="List, pull, inspect and convert models.", no_args_is_help=True)
console = Console()


def human_count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@app.command("list")
@clean_errors
def list_models(presets: bool = typer.Option(False, "--presets", help="List the config presets instead.")):
    """The registered models (or presets) with their size and whether they are cached."""
    if presets:
        table = Table("preset", "arch", "layers", "hidden", "heads/kv", "parameters")
        for name, c in registry.presets.items():
            table.add_row(name, c.model_type, str(c.num_layers), str(c.hidden_size),
                          f"{c.num_heads}/{c.kv_heads}", human_count(c.num_parameters()))
    else:
        table = Table("name", "arch", "parameters", "source", "cached")
        for name, source in registry.model_sources.items():
            config = registry.presets.get(source.preset)
            table.add_row(name, config.model_type, human_count(config.num_parameters()),
                          source.origin, "yes" if source.is_cached else "no")
    console.print(table)


@app.command()
@clean_errors
def pull(name: str, force: bool = typer.Option(False, "--force", help="Fetch and convert again.")):
    """Fetch a registered model and cache it as an HF-format directory."""
    from mlx_core.sources import pull as pull_model

    typer.echo(pull_model(name, force=force))


def _existing_path(text: str) -> Path:
    """The local path ``text`` names; a missing path or an unknown model name is an error."""
    path = Path(text).expanduser()
    if path.exists():
        return path
    if "/" in text or text.endswith(".gguf"):
        raise FileNotFoundError(f"{text} does not exist")
    raise UnknownNameError(registry.model_sources.unknown_message(text))


def _describe(name: str) -> tuple[ModelConfig, dict[str, str]]:
    facts: dict[str, str] = {}
    if name in registry.model_sources:
        source = registry.model_sources.get(name)
        facts["origin"] = source.origin
        facts["description"] = source.description
        if source.is_cached:
            facts["cache"] = f"{source.cache_dir} ({_dir_size(source.cache_dir) / 1e6:.0f} MB)"
            return ModelConfig.from_pretrained(source.cache_dir), facts
        facts["cache"] = f"not cached (mlx models pull {name})"
        return registry.presets.get(source.preset), facts
    if name in registry.presets:
        return registry.presets.get(name), {"origin": "preset (config only, no weights)"}
    path = _existing_path(name)
    if path.is_dir():
        return ModelConfig.from_pretrained(path), {"origin": f"directory {path}"}
    if path.suffix == ".gguf":
        raise ValueError(f"{name} is a GGUF file: run  mlx models convert {name} DIR  and then "
                         "mlx models info DIR")
    raise ValueError(f"{name} is not a model: expected an HF-format directory with config.json")


@app.command()
@clean_errors
def info(name: str = typer.Argument(..., help="A registered model, a preset or an HF directory.")):
    """Config, size and cache state of a model."""
    from mlx_core.plugins import load_plugins

    config, facts = _describe(name)
    load_plugins()
    backends = (registry.architectures.get(config.model_type)
                if config.model_type in registry.architectures else {})
    runs_on = [path for backend, path in (("torch", "train, tune, serve (torch)"),
                                          ("flax", "jax (mlx-jax)")) if backend in backends]
    kv_per_token = 2 * config.num_layers * config.kv_heads * config.dim_per_head  # keys + values
    table = Table("field", "value", title=name)
    table.add_row("family", config.model_type)
    table.add_row("parameters", f"{human_count(config.num_parameters())} ({config.num_parameters():,})")
    if config.is_moe:
        active = config.num_parameters(active=True)
        table.add_row("active per token", f"{human_count(active)} ({active:,}): "
                      f"{config.num_experts_per_tok} of {config.num_experts} experts")
    table.add_row("KV cache per token", f"{kv_per_token * 4:,} bytes fp32, {kv_per_token * 2:,} "
                                        "bytes bf16")
    table.add_row("runs on", "; ".join(runs_on) or "no installed backend")
    for key, value in facts.items():
        table.add_row(key, value)
    for key, value in config.to_dict().items():
        if value not in (None, {}, [], ()):
            table.add_row(key, str(value))
    console.print(table)


@app.command()
@clean_errors
def convert(src: str = typer.Argument(..., help="A .gguf file, an HF directory or a registered model."),
            dst: Path = typer.Argument(..., help="The HF-format directory to write."),
            overwrite: bool = typer.Option(False, "--overwrite", help="Replace DST if it exists.")):
    """Write SRC as an HF-format directory (config.json, safetensors, tokenizer)."""
    from mlx_core.paths import atomic_directory
    from mlx_core.sources import convert_to_hf_dir, resolve_model_dir

    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it")
    src_path = resolve_model_dir(src) if src in registry.model_sources else _existing_path(src)
    with atomic_directory(dst, overwrite=overwrite) as out:
        convert_to_hf_dir(src_path, out)
    typer.echo(dst)


@app.command()
@clean_errors
def quantize(src: str = typer.Argument(..., help="A registered model, an HF directory or a .gguf file."),
             dst: Path = typer.Argument(..., help="The directory to write."),
             scheme: str = typer.Option(..., "--scheme", "-s",
                                        help="int8, int4 (int4-g64, int4-g128), w8a8, or gguf "
                                             "(a GGUF source's tensors as shipped)."),
             overwrite: bool = typer.Option(False, "--overwrite", help="Replace DST if it exists.")):
    """Write SRC with quantized weights: safetensors + config.json recording the scheme, which
    `mlx generate -m DST` (load_model) reads back as it is."""
    from mlx_core import require_torch
    from mlx_core.transforms import parse_scheme

    parse_scheme(scheme)  # a bad scheme fails before anything loads
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it")
    require_torch("mlx models quantize")
    from mlx_core import load_model, save_model

    save_model(load_model(src, quantization=scheme), dst, overwrite=overwrite)
    typer.echo(dst)
