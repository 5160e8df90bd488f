"""mlx-serve: a paged-KV continuous-batching engine (offline ``LLM`` API) for the mlx zoo.

``from mlx_serve import LLM, SamplingParams``; ``LLMEngine`` for step-by-step control.
"""

from mlx_serve.config import EngineConfig
from mlx_serve.engine import LLMEngine
from mlx_serve.llm import LLM
from mlx_serve.outputs import CompletionOutput, EmbeddingRequestOutput, RequestOutput
from mlx_serve.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput",
           "CompletionOutput", "EmbeddingRequestOutput"]
