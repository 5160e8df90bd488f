"""mlx-kernels: the hot ops of training and serving, each a Triton kernel with an exact torch
reference, dispatched by device (``MLX_KERNELS=auto|torch|triton``; see ``dispatch``).

``import mlx_kernels`` does not import triton: kernels are loaded on first use.
"""

from mlx_kernels.dispatch import backend_for, describe
from mlx_kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from mlx_kernels.geglu import geglu, gelu_tanh
from mlx_kernels.kv_cache import write_kv_cache
from mlx_kernels.lora import lora_linear, lora_linear_multi
from mlx_kernels.moe import moe_grouped_matmul, moe_route
from mlx_kernels.nf4 import NF4Weight, nf4_dequantize, nf4_matmul, nf4_quantize
from mlx_kernels.paged_attention import paged_attention_decode
from mlx_kernels.rms_norm import rms_norm
from mlx_kernels.rope import rope
from mlx_kernels.swiglu import swiglu
from mlx_kernels.varlen_attention import varlen_attention

__version__ = "0.1.0"
__all__ = ["NF4Weight", "backend_for", "describe", "fused_linear_cross_entropy", "geglu",
           "gelu_tanh", "lora_linear", "lora_linear_multi", "moe_grouped_matmul", "moe_route",
           "nf4_dequantize", "nf4_matmul", "nf4_quantize", "paged_attention_decode", "rms_norm",
           "rope", "swiglu", "varlen_attention", "write_kv_cache"]
