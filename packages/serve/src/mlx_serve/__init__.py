"""mlx-serve: a paged-KV continuous-batching engine (offline ``LLM`` API) for the mlx zoo.

``from mlx_serve import LLM, SamplingParams``; ``LLMEngine`` for step-by-step control.
"""

from mlx_core.lazy import lazy_exports

# name -> the module that defines it, imported at first access: the plugin entry point imports
# this package at every `mlx` command's start, and these modules import torch (~2 s)
_EXPORTS = {"LLM": "mlx_serve.llm", "LLMEngine": "mlx_serve.engine",
            "EngineConfig": "mlx_serve.config", "SamplingParams": "mlx_serve.sampling_params",
            "RequestOutput": "mlx_serve.outputs", "CompletionOutput": "mlx_serve.outputs",
            "EmbeddingRequestOutput": "mlx_serve.outputs"}

__version__ = "0.1.0"
__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
