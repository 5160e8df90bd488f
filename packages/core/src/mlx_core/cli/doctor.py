"""``mlx doctor``: what is installed, which devices there are, which kernels run."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from rich.console import Console
from rich.table import Table

from mlx_core import plugins
from mlx_core.cli.errors import clean_errors
from mlx_core.paths import mlx_home

_DISTRIBUTIONS = ("torch", "triton", "jax", "flax", "transformers", "tokenizers", "safetensors",
                  "gguf", "mlx-core", "mlx-kernels", "mlx-adapters", "mlx-train", "mlx-serve",
                  "mlx-jax")


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def _devices() -> str:
    try:
        import torch
    except ImportError:
        return "cpu (torch not installed)"
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return f"cpu, cuda x{torch.cuda.device_count()} ({names})"
    return f"cpu ({torch.get_num_threads()} threads), no CUDA"


def _kernels() -> dict[str, str]:
    try:
        import mlx_kernels
    except ImportError as e:
        return {"kernels": f"unavailable ({e})"}
    return {f"kernels: {k}": str(v) for k, v in mlx_kernels.describe().items()}


@clean_errors
def doctor():
    """Versions, devices, the kernel backend in use and plugins that failed to load."""
    plugins.load_plugins()
    table = Table("item", "value", title="mlx doctor")
    table.add_row("python", platform.python_version())
    for dist in _DISTRIBUTIONS:
        table.add_row(dist, _version(dist))
    table.add_row("devices", _devices())
    for key, value in _kernels().items():
        table.add_row(key, value)
    table.add_row("MLX_HOME", str(mlx_home()))
    for name, error in plugins.failed.items():
        table.add_row(f"plugin {name}", f"[red]failed: {error}[/red]")
    Console().print(table)
