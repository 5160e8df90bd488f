"""NF4 4-bit weights as in QLoRA: the 16-value NormalFloat codebook, one absmax per block of 64
values, and double quantization of those absmax values to 8 bits (one fp32 scale per 256
blocks, after subtracting their mean). The constants live in ``nf4_format`` (torch-free, shared
with ``mlx_kernels.jax``).

Layout: ``codes`` uint8 ``[numel // 2]``, two 4-bit codes per byte (high nibble first);
``absmax_q`` uint8 ``[blocks]``; ``absmax_scale`` fp32 ``[ceil(blocks / 256)]``;
``absmax_offset`` fp32 scalar. Memory: 0.5 byte/parameter + 1 byte per 64 + 4 bytes per 16384.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mlx_kernels.dispatch import backend_for
from mlx_kernels.nf4_format import ABSMAX_BLOCK, BLOCK_SIZE, NF4_CODEBOOK


@dataclass
class NF4Weight:
    codes: torch.Tensor
    absmax_q: torch.Tensor
    absmax_scale: torch.Tensor
    absmax_offset: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype  # the dtype de-quantization returns

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.codes, self.absmax_q, self.absmax_scale, self.absmax_offset))


def nf4_quantize(weight: torch.Tensor) -> NF4Weight:
    """Quantize any tensor whose size is a multiple of 64 (every linear layer we meet)."""
    if weight.numel() % BLOCK_SIZE:
        raise ValueError(f"nf4_quantize needs a size that is a multiple of {BLOCK_SIZE}; "
                         f"got {tuple(weight.shape)} ({weight.numel()} values)")
    blocks = weight.detach().float().reshape(-1, BLOCK_SIZE)
    absmax = blocks.abs().amax(dim=1).clamp(min=1e-12)
    codebook = torch.tensor(NF4_CODEBOOK, device=weight.device)
    # nearest codebook value, by midpoints between neighbours
    codes = torch.bucketize(blocks / absmax[:, None], (codebook[1:] + codebook[:-1]) / 2)
    packed = (codes[:, 0::2] << 4 | codes[:, 1::2]).to(torch.uint8).reshape(-1)
    # double quantization: absmax - mean -> int8 with one fp32 scale per 256 blocks
    offset = absmax.mean()
    centred = F.pad(absmax - offset, (0, -absmax.numel() % ABSMAX_BLOCK)).reshape(-1, ABSMAX_BLOCK)
    scale = centred.abs().amax(dim=1).clamp(min=1e-12) / 127
    absmax_q = (torch.round(centred / scale[:, None]).clamp(-127, 127) + 128).to(torch.uint8)
    return NF4Weight(packed, absmax_q.reshape(-1)[: absmax.numel()], scale, offset,
                     tuple(weight.shape), weight.dtype)


def nf4_absmax(q: NF4Weight) -> torch.Tensor:
    """The fp32 absmax of every block, de-quantized from 8 bits."""
    index = torch.arange(q.absmax_q.numel(), device=q.codes.device) // ABSMAX_BLOCK
    return (q.absmax_q.float() - 128) * q.absmax_scale[index] + q.absmax_offset


def nf4_dequantize_reference(q: NF4Weight) -> torch.Tensor:
    codebook = torch.tensor(NF4_CODEBOOK, device=q.codes.device)
    codes = torch.stack([q.codes >> 4, q.codes & 0xF], dim=1).reshape(-1, BLOCK_SIZE).long()
    values = codebook[codes] * nf4_absmax(q)[:, None]
    return values.reshape(q.shape).to(q.dtype)


def nf4_dequantize(q: NF4Weight) -> torch.Tensor:
    """The ``q.shape`` tensor in ``q.dtype``."""
    if backend_for(q.codes.device) == "triton":
        from mlx_kernels import _nf4_triton

        return _nf4_triton.dequantize(q.codes, nf4_absmax(q), q.shape, q.dtype)
    return nf4_dequantize_reference(q)


class NF4MatmulFunction(torch.autograd.Function):
    """Triton forward ``x Wᵀ + b`` and input gradient ``dy W``, each de-quantizing NF4 tiles
    inside the GEMM loop: the full-precision weight is never materialised. The 4-bit weight is
    frozen (QLoRA), so it gets no gradient."""

    @staticmethod
    def forward(ctx, x, q, bias):
        from mlx_kernels import _nf4_triton

        y = _nf4_triton.matmul(x.reshape(-1, x.shape[-1]).contiguous(), q, bias)
        ctx.save_for_backward(q.codes, q.absmax_q, q.absmax_scale, q.absmax_offset)
        ctx.w_shape, ctx.w_dtype, ctx.x_shape, ctx.has_bias = q.shape, q.dtype, x.shape, bias is not None
        return y.view(*x.shape[:-1], q.shape[0])

    @staticmethod
    def backward(ctx, dy):
        from mlx_kernels import _nf4_triton

        q = NF4Weight(*ctx.saved_tensors, ctx.w_shape, ctx.w_dtype)
        dy2d = dy.reshape(-1, dy.shape[-1]).contiguous()
        dx = _nf4_triton.matmul_dx(dy2d, q).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        dbias = dy2d.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, None, dbias


def nf4_matmul(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequantize(q)ᵀ (+ bias)`` for an NF4 weight ``[out, in]``; differentiable in x
    (the 4-bit weight is frozen, as in QLoRA)."""
    if backend_for(x.device) == "triton":
        if len(q.shape) != 2 or x.shape[-1] != q.shape[1]:
            raise ValueError(f"nf4_matmul: x [..., in] needs an NF4 weight [out, in]; "
                             f"got {tuple(x.shape)} and {tuple(q.shape)}")
        return NF4MatmulFunction.apply(x, q, bias)
    return F.linear(x, nf4_dequantize(q).to(x.dtype), bias)
