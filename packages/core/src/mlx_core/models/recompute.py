"""Activation memory in training: recompute cheap activations instead of saving them.

An MLP's hidden activation (``swiglu(gate, up)``, ``[tokens, intermediate]``, the largest tensor
of a layer) is saved by ``down_proj`` for its backward (dW or the LoRA update needs it), while
``gate`` and ``up`` are saved by the activation itself. ``recompute_when_saved`` makes ops that
save the hidden activation keep a recipe instead (the inputs are held anyway) and rebuild it
when backward asks: one elementwise op per layer for a tensor's worth of memory (Megatron's
"selective" recompute; ``torch.utils.checkpoint`` recomputes whole layers). The decoder layer
does the same for its two norm outputs, rebuilt from the norm's input (which the norm saves).

Inside a layer that ``torch.utils.checkpoint`` already recomputes, the recipe would keep inputs
alive that checkpointing drops: ``run_checkpointed_layer`` runs a layer with
``recomputing_layer()`` true, so neither the MLPs nor the norms keep a recipe there.

The zoo's modules do not use this themselves: ``mlx_core.transforms.selective_recompute`` swaps
in the MLP and decoder-layer forms that do (applied by whoever trains).
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Callable

import torch

_in_checkpointed_layer = contextvars.ContextVar("mlx_in_checkpointed_layer", default=False)


def run_checkpointed_layer(layer: Callable, *args):
    """``layer(*args)``, marked as a layer that ``torch.utils.checkpoint`` recomputes (pass this,
    with the layer first, as the checkpointed function)."""
    token = _in_checkpointed_layer.set(True)
    try:
        return layer(*args)
    finally:
        _in_checkpointed_layer.reset(token)


def recomputing_layer() -> bool:
    return _in_checkpointed_layer.get()


class _Recipe:
    """How to rebuild a saved view of the tensor: its shape, strides and offset within it."""

    __slots__ = ("build", "size", "stride", "offset")

    def __init__(self, build: Callable[[], torch.Tensor], saved: torch.Tensor, of: torch.Tensor):
        self.build, self.size, self.stride = build, saved.size(), saved.stride()
        self.offset = saved.storage_offset() - of.storage_offset()

    def __call__(self) -> torch.Tensor:
        rebuilt = self.build()
        return rebuilt.as_strided(self.size, self.stride, rebuilt.storage_offset() + self.offset)


def _is_view_of(saved: torch.Tensor, tensor: torch.Tensor) -> bool:
    """``saved`` is ``tensor`` or a view of all or part of it (ops often save ``x.reshape(...)``)."""
    if saved is tensor:
        return True
    if saved.device != tensor.device or saved.dtype != tensor.dtype:
        return False
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    return (saved.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
            and start <= saved.data_ptr() < end)


def worth_recomputing(tensor: torch.Tensor) -> bool:
    """Training (a graph is recorded through ``tensor``) outside a checkpointed layer."""
    return torch.is_grad_enabled() and tensor.requires_grad and not recomputing_layer()


@contextlib.contextmanager
def recompute_when_saved(tensor: torch.Tensor, build: Callable[[], torch.Tensor]):
    """In this block, an op that saves ``tensor`` for backward saves ``build`` instead, which
    backward calls (with grad off) to get an equal tensor. ``build`` must give the same values
    bit for bit (the same ops on inputs the graph keeps anyway), contiguous."""

    if not tensor.is_contiguous():  # a rebuilt tensor is contiguous: views would not line up
        yield
        return

    # weakly: torch keeps the pack hook as long as anything it packed is saved
    target = weakref.ref(tensor)

    def pack(saved: torch.Tensor):
        of = target()
        return _Recipe(build, saved, of) if of is not None and _is_view_of(saved, of) else saved

    def unpack(packed):
        return packed() if isinstance(packed, _Recipe) else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
