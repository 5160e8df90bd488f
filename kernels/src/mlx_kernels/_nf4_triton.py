"""Triton NF4 de-quantization: one program per 1024 output values; codes looked up in the
16-entry codebook and scaled by their block's absmax."""

import torch
import triton
import triton.language as tl

from mlx_kernels.nf4 import BLOCK_SIZE, NF4_CODEBOOK

BLOCK = 1024


@triton.jit
def _dequant(CODES, ABSMAX, CODEBOOK, OUT, N, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    byte = tl.load(CODES + offs // 2, mask=mask, other=0).to(tl.int32)
    code = tl.where(offs % 2 == 0, byte >> 4, byte & 0xF)
    value = tl.load(CODEBOOK + code, mask=mask, other=0.0)
    scale = tl.load(ABSMAX + offs // GROUP, mask=mask, other=0.0)
    tl.store(OUT + offs, (value * scale).to(OUT.dtype.element_ty), mask=mask)


def dequantize(codes, absmax, shape, dtype):
    n = codes.numel() * 2
    out = torch.empty(n, dtype=dtype, device=codes.device)
    codebook = torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=codes.device)
    _dequant[(triton.cdiv(n, BLOCK),)](codes, absmax.contiguous(), codebook, out, n,
                                       GROUP=BLOCK_SIZE, BLOCK=BLOCK)
    return out.view(shape)
