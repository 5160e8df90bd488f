"""mlx-serve: a paged-KV continuous-batching engine (offline ``LLM`` API) for the mlx zoo.

``from mlx_serve import LLM, SamplingParams``; ``LLMEngine`` for step-by-step control.
"""

from importlib import import_module

# name -> the module that defines it, imported at first access (PEP 562): the plugin entry point
# imports this package at every `mlx` command's start, and these modules import torch (~2 s)
_EXPORTS = {"LLM": "mlx_serve.llm", "LLMEngine": "mlx_serve.engine",
            "EngineConfig": "mlx_serve.config", "SamplingParams": "mlx_serve.sampling_params",
            "RequestOutput": "mlx_serve.outputs", "CompletionOutput": "mlx_serve.outputs",
            "EmbeddingRequestOutput": "mlx_serve.outputs"}

__version__ = "0.1.0"
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mlx_serve' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
