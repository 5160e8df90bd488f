"""Linear layer + cross-entropy in chunks of tokens: the ``[tokens, vocab]`` logits never exist.

The gradients for the hidden states, the weight and the bias are computed in the forward pass,
chunk by chunk (as Liger-Kernel does), so only one chunk's logits are alive at a time; the
backward pass only scales them by the incoming gradient.
"""

from __future__ import annotations

import math

import torch

from mlx_kernels.dispatch import backend_for

REDUCTIONS = ("mean", "sum")


MIN_CHUNK, MAX_CHUNK = 256, 4096


def default_chunk_size(n_tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk: enough that one chunk's logits cost about as much memory as all hidden
    states (Liger's rule), but at least 256 — each chunk re-reads the whole head weight and adds
    into its gradient, so tiny chunks are slow (measured on CPU, 2048 tokens x 49k vocab: 64-token
    chunks 4.1 s, 256-token chunks 2.8 s, same peak memory)."""
    chunks = math.ceil(vocab / hidden)
    size = 1 << max(math.ceil(n_tokens / chunks) - 1, 0).bit_length()
    return min(max(size, MIN_CHUNK), MAX_CHUNK)


def chunk_loss_and_grad_reference(logits, labels, keep, label_smoothing, grad_scale, needs_grad):
    """Per-row losses of an fp32 logits chunk, and (optionally) d loss / d logits scaled by
    ``grad_scale``: softmax - (1 - eps) * onehot - eps / V, zero on ignored rows.

    With ``needs_grad`` the gradient overwrites ``logits`` in place (as the Triton kernel does):
    five passes over the chunk and no temporaries, which is most of this op's time on CPU once
    the GEMMs are done."""
    vocab = logits.shape[1]
    target_ids = labels.clamp(0, vocab - 1)[:, None]
    target = logits.gather(1, target_ids).squeeze(1)
    mean = logits.mean(-1) if label_smoothing else None
    if not needs_grad:
        lse = torch.logsumexp(logits, dim=-1)
    else:
        top = logits.amax(dim=-1, keepdim=True)
        exps = logits.sub_(top).exp_()  # in place: logits is consumed
        total = exps.sum(dim=-1)
        lse = top.squeeze(1) + total.log()
    loss = lse - target
    if label_smoothing:
        loss = (1 - label_smoothing) * loss + label_smoothing * (lse - mean)
    loss = loss.masked_fill(~keep, 0)
    if not needs_grad:
        return loss, None
    row_scale = keep.float() * grad_scale
    grad = exps.mul_((row_scale / total)[:, None])  # softmax, scaled
    grad.scatter_add_(1, target_ids, (-(1 - label_smoothing) * row_scale)[:, None])
    if label_smoothing:
        grad.sub_((label_smoothing / vocab) * row_scale[:, None])
    return loss, grad


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, label_smoothing, reduction,
                chunk_size, wants):
        n, vocab = hidden.shape[0], weight.shape[0]
        want_hidden, want_weight, want_bias = wants  # only what requires grad is computed
        needs_grad = any(wants)
        valid = labels != ignore_index
        divisor = valid.sum().float() if reduction == "mean" else torch.ones((), device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if want_bias else None
        if backend_for(hidden.device) == "triton":
            from mlx_kernels._cross_entropy_triton import chunk_loss_and_grad
        else:
            chunk_loss_and_grad = chunk_loss_and_grad_reference
        grad_scale = 1.0 / divisor
        with torch.no_grad():
            for start in range(0, n, chunk_size):
                h = hidden[start:start + chunk_size]
                logits = torch.nn.functional.linear(h, weight, bias).float()
                loss, grad = chunk_loss_and_grad(logits, labels[start:start + chunk_size],
                                                 valid[start:start + chunk_size], label_smoothing,
                                                 grad_scale, needs_grad)
                total += loss.sum()
                if not needs_grad:
                    continue
                if grad_hidden is not None:
                    grad_hidden[start:start + chunk_size] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += grad.t() @ h.float()
                if grad_bias is not None:
                    grad_bias += grad.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        dh = grad_hidden * grad_output if grad_hidden is not None else None
        dw = (grad_weight * grad_output).to(weight_dtype) if grad_weight is not None else None
        db = (grad_bias * grad_output).to(bias_dtype) if grad_bias is not None else None
        return dh, dw, db, None, None, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               bias: torch.Tensor | None = None, ignore_index: int = -100,
                               label_smoothing: float = 0.0, reduction: str = "mean",
                               chunk_size: int | None = None) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, labels)`` without building the full logits.

    ``hidden [N, H]``, ``weight [V, H]``, ``bias [V]`` or None, ``labels [N]`` (int64;
    ``ignore_index`` rows count for nothing). ``reduction``: ``"mean"`` over non-ignored tokens
    (as ``F.cross_entropy``) or ``"sum"``. Logits are computed in fp32, one chunk of tokens at
    a time (``chunk_size``, default: see ``default_chunk_size``); each chunk's loss and logit
    gradient come from a Triton kernel (overwriting the chunk's logits in place) or from the
    torch reference. Returns a scalar fp32 loss, differentiable in hidden, weight and bias.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1] or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"fused_linear_cross_entropy expects hidden [N, H], weight [V, H], labels [N]; got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    chunk = chunk_size or default_chunk_size(hidden.shape[0], hidden.shape[1], weight.shape[0])
    # Decided here: inside Function.forward grad mode is always off. A frozen head (LoRA) costs
    # no weight gradient: that GEMM is as large as the logits' own.
    grad_on = torch.is_grad_enabled()
    wants = tuple(grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias))
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, labels, ignore_index,
                                            label_smoothing, reduction, chunk, wants)
