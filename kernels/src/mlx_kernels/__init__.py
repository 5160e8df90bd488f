"""mlx-kernels: the hot ops of training and serving, each a Triton kernel with an exact torch
reference, dispatched by device (``MLX_KERNELS=auto|torch|triton``; see ``dispatch``), and the
same ops for JAX in ``mlx_kernels.jax``.

``import mlx_kernels`` imports neither torch nor triton: each public name below loads its
module (and with it torch) on first access (PEP 562), so ``mlx_kernels.jax`` works where torch
is not installed (``pip install 'mlx-kernels[jax]'``), and triton loads on first kernel launch.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> the module (under mlx_kernels) that defines it
_API = {
    "backend_for": "dispatch",
    "describe": "dispatch",
    "fused_linear_cross_entropy": "fused_linear_cross_entropy",
    "geglu": "geglu",
    "gelu_tanh": "geglu",
    "write_kv_cache": "kv_cache",
    "linear": "linear",
    "lora_linear": "lora",
    "lora_linear_multi": "lora",
    "add_lora_multi": "lora",
    "moe_grouped_matmul": "moe",
    "moe_route": "moe",
    "NF4Weight": "nf4",
    "nf4_dequantize": "nf4",
    "nf4_matmul": "nf4",
    "nf4_quantize": "nf4",
    "paged_attention_decode": "paged_attention",
    "int8_linear": "quantized_linear",
    "int4_linear": "quantized_linear",
    "w8a8_linear": "quantized_linear",
    "rms_norm": "rms_norm",
    "softcap_attention": "softcap_attention",
    "rope": "rope",
    "swiglu": "swiglu",
    "varlen_attention": "varlen_attention",
}
# Op modules the eager package used to import, reachable as attributes (``mlx_kernels.nf4``)
# as they were; those named like their op (``rms_norm``) are the op, as they were too.
_SUBMODULES = frozenset(_API.values()) - frozenset(_API)
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(f"{__name__}.{_API[name]}")
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        raise ModuleNotFoundError(
            f"mlx_kernels.{name} needs torch: pip install 'mlx-kernels[torch]' "
            "(mlx_kernels.jax needs only jax)", name="torch") from e
    value = getattr(module, name)
    globals()[name] = value  # later lookups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API) | _SUBMODULES)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule ``mlx_kernels.rms_norm`` (``from mlx_kernels.rms_norm import
        # rms_norm_reference``) makes the import system set the package attribute ``rms_norm``
        # to that module, which would hide the op of the same name; keep the op, as the eager
        # ``from mlx_kernels.rms_norm import rms_norm`` this package once ran did.
        if (_API.get(name) == name and isinstance(value, types.ModuleType)
                and value.__name__ == f"{__name__}.{name}"):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
