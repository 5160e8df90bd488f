"""Transforms: functions from a loaded model to a model that runs differently.

The zoo's modules describe the model and nothing else. A transform swaps some of its modules for
its own (``swap_linears``, the seam): prepacked weights and uncopied output layouts
(``fast_linear``) change how it runs and not what it computes; quantization (``quantize``:
int8/int4 weight-only, W8A8) changes what it computes, within a stated quality budget;
``fuse_projections`` runs the projections that read one input as one GEMM;
``selective_recompute`` (training) rebuilds cheap activations in backward instead of keeping them;
``tensor_parallel.shard_model`` cuts a model to one rank's share of a torch.distributed group
(the serving engine's tensor parallelism). Whoever
wants a transform applies it (``load_model(..., quantization=...)``, the serving engine, a script).
"""

from mlx_core.transforms.fast_linear import (
    FastLinear,
    prepack_linear_weights,
    uncopied_mlp_outputs,
)
from mlx_core.transforms.fuse import fuse_projections, unfuse_projections
from mlx_core.transforms.quantize import (
    SCHEMES,
    Int4Linear,
    Int8Linear,
    QuantizationScheme,
    QuantizedEmbedding,
    QuantizedLinear,
    W8A8Linear,
    parse_scheme,
    quantize,
)
from mlx_core.transforms.recompute import selective_recompute
from mlx_core.transforms.swap import swap_linears

__all__ = ["FastLinear", "fuse_projections", "unfuse_projections", "prepack_linear_weights", "uncopied_mlp_outputs", "SCHEMES", "Int4Linear", "Int8Linear", "QuantizationScheme", "QuantizedEmbedding",
           "QuantizedLinear", "W8A8Linear", "parse_scheme", "quantize", "selective_recompute", "swap_linears"]
