"""Triton cross-entropy over one chunk of fp32 logits: one program per row computes the row's
loss with an online log-sum-exp, then overwrites the row with d loss / d logits (as Liger does:
the chunk's logits buffer is reused for its gradient)."""

import torch
import triton
import triton.language as tl

BLOCK_V = 1024


@triton.jit
def _ce_rows(LOGITS, LABELS, KEEP, LOSS, V, eps, grad_scale, NEEDS_GRAD: tl.constexpr,
             BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    base = LOGITS + row.to(tl.int64) * V
    label = tl.load(LABELS + row).to(tl.int32)
    keep = tl.load(KEEP + row).to(tl.int1)
    label = tl.minimum(tl.maximum(label, 0), V - 1)
    m = tl.full([1], float("-inf"), tl.float32)
    total = tl.zeros([1], tl.float32)
    logit_sum = tl.zeros([1], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        logit_sum += tl.sum(tl.where(cols < V, x, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(total)
    target = tl.load(base + label)
    loss = (1.0 - eps) * (lse - target) + eps * (lse - logit_sum / V)
    tl.store(LOSS + row + tl.arange(0, 1), tl.where(keep, loss, 0.0))
    if NEEDS_GRAD:
        scale = tl.where(keep, grad_scale, 0.0)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(base + cols, mask=cols < V, other=0.0)
            g = tl.exp(x - lse) - eps / V - tl.where(cols == label, 1.0 - eps, 0.0)
            tl.store(base + cols, g * scale, mask=cols < V)


def chunk_loss_and_grad(logits, labels, keep, label_smoothing, grad_scale, needs_grad):
    """Same contract as the reference; the returned gradient IS ``logits`` (overwritten)."""
    rows, vocab = logits.shape
    logits = logits.contiguous()
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    _ce_rows[(rows,)](logits, labels.contiguous(), keep.contiguous(), loss, vocab,
                      float(label_smoothing), float(grad_scale), NEEDS_GRAD=needs_grad,
                      BLOCK_V=BLOCK_V)
    return loss, logits if needs_grad else None
