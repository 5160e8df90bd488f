"""NF4 4-bit weights as in QLoRA: the 16-value NormalFloat codebook, one absmax per block of 64
values, and double quantization of those absmax values to 8 bits (one fp32 scale per 256
blocks, after subtracting their mean).

Layout: ``codes`` uint8 ``[numel // 2]``, two 4-bit codes per byte (high nibble first);
``absmax_q`` uint8 ``[blocks]``; ``absmax_scale`` fp32 ``[ceil(blocks / 256)]``;
``absmax_offset`` fp32 scalar. Memory: 0.5 byte/parameter + 1 byte per 64 + 4 bytes per 16384.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mlx_kernels.dispatch import backend_for

# QLoRA's NF4 values (Dettmers et al. 2023, appendix E; bitsandbytes' table).
NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCK_SIZE = 64
ABSMAX_BLOCK = 256


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


def nf4_matmul(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequantize(q)ᵀ (+ bias)`` for an NF4 weight ``[out, in]``; differentiable in x
    (the 4-bit weight is frozen, as in QLoRA)."""
    return F.linear(x, nf4_dequantize(q).to(x.dtype), bias)
