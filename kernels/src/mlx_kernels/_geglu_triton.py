"""Triton GELU-tanh / GeGLU, elementwise over flat blocks (``HAS_UP`` off: plain GELU)."""

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _sqrt_2_over_pi():
    # a function, not a module global: a jit function may read only constexpr globals on a GPU
    # (a plain float runs under the interpreter, which does not check; a tl.constexpr global
    # fails there instead)
    return 0.7978845608028654


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _geglu_fwd(G, U, Y, N, HAS_UP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    act = 0.5 * g * (1.0 + _tanh(_sqrt_2_over_pi() * (g + 0.044715 * g * g * g)))
    if HAS_UP:
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        act = act.to(G.dtype.element_ty).to(tl.float32) * u  # rounded as F.gelu(g) * u is
    tl.store(Y + offs, act.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd(DY, G, U, DG, DU, N, HAS_UP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    inner = _sqrt_2_over_pi() * (g + 0.044715 * g * g * g)
    t = _tanh(inner)
    act = 0.5 * g * (1.0 + t)
    d_act = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * _sqrt_2_over_pi() * (1.0 + 3 * 0.044715 * g * g)
    if HAS_UP:
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DU + offs, (dy * act).to(DU.dtype.element_ty), mask=mask)
        dy = dy * u
    tl.store(DG + offs, (dy * d_act).to(DG.dtype.element_ty), mask=mask)


def forward(gate, up):
    y = torch.empty_like(gate)
    n = gate.numel()
    _geglu_fwd[(triton.cdiv(n, BLOCK),)](gate, gate if up is None else up, y, n,
                                         HAS_UP=up is not None, BLOCK=BLOCK)
    return y


def backward(dy, gate, up):
    dg = torch.empty_like(gate)
    du = None if up is None else torch.empty_like(up)
    n = gate.numel()
    _geglu_bwd[(triton.cdiv(n, BLOCK),)](dy, gate, gate if up is None else up, dg,
                                         dg if du is None else du, n, HAS_UP=up is not None,
                                         BLOCK=BLOCK)
    return dg, du
