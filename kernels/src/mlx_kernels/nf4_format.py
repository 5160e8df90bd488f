"""The NF4 storage format, shared by the torch ops (``mlx_kernels.nf4``) and the JAX ones
(``mlx_kernels.jax``): plain Python constants, so neither side imports the other's framework.

QLoRA's 16-value NormalFloat codebook, one absmax per block of ``BLOCK_SIZE`` values, and the
absmax values double-quantized to 8 bits with one fp32 scale per ``ABSMAX_BLOCK`` blocks.
"""

# QLoRA's NF4 values (Dettmers et al. 2023, appendix E; bitsandbytes' table).
NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCK_SIZE = 64  # values per absmax
ABSMAX_BLOCK = 256  # absmax values per fp32 scale (double quantization)

__all__ = ["ABSMAX_BLOCK", "BLOCK_SIZE", "NF4_CODEBOOK"]
