"""Fused projections: the linear layers that read one input run as one GEMM.

An attention's q/k/v projections all read the normed hidden state, as a gated MLP's gate/up
projections do. ``fuse_projections`` stacks each group's weights by rows into one layer
(``qkv_proj``, ``gate_up_proj``, the names Phi-3 ships them under) and swaps the module for the
zoo class's fused form (``FusedAttention``, ``FusedGatedMLP``), whose ``project`` runs that one
layer and splits its output. One call instead of three (two): for a decode step that is a third
fewer GEMM calls, and under W8A8 the shared input is quantized once instead of three (two) times.

Every scheme quantizes each output row on its own (per-channel int8, int4 groups along a row,
W8A8's per-token activation scale is the input's), so stacking rows computes exactly what the
separate layers did: the logits are unchanged. Layers that cannot be stacked (another type,
bias or group layout, e.g. a GGUF file's Q6_K ``attn_v`` beside Q4_K ``attn_q``; adapter
wrappers) stay separate.

The state dict keeps the zoo's names (the fused tensors are split by rows on the way out and
stacked on the way in), so saving, ``load_state_dict`` and checkpoints see no difference.
Adapters that target one of the projections by name need the separate layers:
``unfuse_projections`` splits them again (the serving engine does so when a LoRA adapter is
loaded). Apply it to a model for inference, after quantization (SmoothQuant finds the layers by
their zoo names).
"""

from __future__ import annotations

import torch
from torch import nn

from mlx_core.models.linear import Linear
from mlx_core.models.transformer import Attention, GatedMLP
from mlx_core.transforms.fast_linear import FastLinear
from mlx_core.transforms.quantize import Int4Linear, Int8Linear, QuantizedLinear
from mlx_kernels.linear import pack_weight

# each quantized layer type: its per-row tensors, in its constructor's order (bias comes last)
_ROW_TENSORS = {Int8Linear: ("qweight", "scale"), Int4Linear: ("qweight", "scales", "mins")}


class FusedAttention(Attention):
    """``Attention`` whose q/k/v projections are one layer, ``qkv_proj``."""

    fused_name = "qkv_proj"
    fused_names = ("q_proj", "k_proj", "v_proj")

    def project(self, x):
        return self.qkv_proj(x).split(self.fused_sizes, dim=-1)


class FusedGatedMLP(GatedMLP):
    """``GatedMLP`` whose gate/up projections are one layer, ``gate_up_proj``."""

    fused_name = "gate_up_proj"
    fused_names = ("gate_proj", "up_proj")

    def project(self, x):
        return self.gate_up_proj(x).split(self.fused_sizes, dim=-1)


_FUSED = {Attention: FusedAttention, GatedMLP: FusedGatedMLP}


def fuse_projections(model: nn.Module) -> list[str]:
    """Fuse every attention's q/k/v and every gated MLP's gate/up projections of ``model`` in
    place (see the module docstring); returns the names of the modules fused. A module whose
    layers cannot be stacked is left as it is."""
    fused = []
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            kind = _FUSED.get(type(module))
            if kind is None:
                continue
            layers = [getattr(module, n) for n in kind.fused_names]
            stacked = stack_rows(layers)
            if stacked is None:
                continue
            for n in kind.fused_names:
                delattr(module, n)
            module.__class__ = kind  # the zoo class's fused form: only ``project`` differs
            module.fused_sizes = [layer.out_features for layer in layers]
            setattr(module, kind.fused_name, stacked)
            module._fusion_hooks = (module.register_state_dict_post_hook(_split_state),
                                    module.register_load_state_dict_pre_hook(_stack_state))
            fused.append(name)
    return fused


def unfuse_projections(model: nn.Module, only: set[str] | None = None) -> list[str]:
    """Undo ``fuse_projections``: each fused layer split back into the zoo's separate ones
    (copies of its rows, prepacked again where it was); ``only``: just the modules of these
    names (e.g. those an adapter targets layers of). Returns the names of the modules split."""
    split = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, (FusedAttention, FusedGatedMLP)):
            continue
        if only is not None and name not in only:
            continue
        stacked = getattr(module, module.fused_name)
        parts = split_rows(stacked, module.fused_sizes)
        for handle in module._fusion_hooks:
            handle.remove()
        delattr(module, module.fused_name)
        names = module.fused_names
        module.__class__ = type(module).__mro__[1]  # back to the zoo class
        del module.fused_sizes, module._fusion_hooks
        for n, part in zip(names, parts, strict=True):
            setattr(module, n, part)
        split.append(name)
    return split


def stack_rows(layers: list[nn.Module]) -> nn.Module | None:
    """One layer computing ``cat([layer(x) for layer in layers], -1)``: their weights (and every
    per-row tensor) stacked by rows; None when they cannot be (other types, input sizes, bias,
    dtypes or group layouts)."""
    first = layers[0]
    if any(type(layer) is not type(first) for layer in layers):
        return None
    if any(layer.in_features != first.in_features or (layer.bias is None) != (first.bias is None)
           for layer in layers):
        return None
    bias = None if first.bias is None else _cat([layer.bias for layer in layers])
    if isinstance(first, QuantizedLinear):
        names = next((v for k, v in _ROW_TENSORS.items() if isinstance(first, k)), None)
        tensors = names and [_cat([getattr(layer, n) for layer in layers]) for n in names]
        if not tensors or any(t is None for t in tensors) or (first.bias is not None and bias is None):
            return None
        return type(first)(*tensors, bias).computing_in(first.compute_dtype)
    if type(first) not in (nn.Linear, Linear, FastLinear):
        return None  # an adapter's wrapper, or another module we do not know the rows of
    weight = _cat([layer.weight for layer in layers])
    if weight is None or (first.bias is not None and bias is None):
        return None
    fused = FastLinear(first.in_features, weight.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=first.weight.requires_grad)
    fused.bias = None if bias is None else nn.Parameter(bias, requires_grad=first.bias.requires_grad)
    fused.contiguous_output = getattr(first, "contiguous_output", True)
    return fused  # packed_weight: none (prepack_linear_weights packs the stacked weight)


def split_rows(stacked: nn.Module, sizes: list[int]) -> list[nn.Module]:
    """The layers ``stack_rows`` stacked, as copies of ``stacked``'s rows."""
    def parts(t):
        return [None] * len(sizes) if t is None else [p.clone() for p in t.split(sizes)]

    bias = parts(stacked.bias)
    if isinstance(stacked, QuantizedLinear):
        names = next(v for k, v in _ROW_TENSORS.items() if isinstance(stacked, k))
        tensors = zip(*[parts(getattr(stacked, n)) for n in names], strict=True)
        return [type(stacked)(*ts, b).computing_in(stacked.compute_dtype)
                for ts, b in zip(tensors, bias, strict=True)]
    layers = []
    for w, b in zip(parts(stacked.weight), bias, strict=True):
        layer = FastLinear(stacked.in_features, w.shape[0], bias=False, device="meta")
        layer.weight = nn.Parameter(w, requires_grad=stacked.weight.requires_grad)
        layer.bias = None if b is None else nn.Parameter(b, requires_grad=stacked.bias.requires_grad)
        layer.contiguous_output = stacked.contiguous_output
        if stacked.packed_weight is not None:
            layer.packed_weight = pack_weight(layer.weight)
        layers.append(layer)
    return layers


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """Stacked by rows, or None where they differ beyond the first dimension (or in dtype)."""
    first = tensors[0]
    if any(t.shape[1:] != first.shape[1:] or t.dtype != first.dtype for t in tensors):
        return None
    return torch.cat([t.detach() for t in tensors])


def _split_state(module, state, prefix, _metadata) -> None:
    """state_dict post-hook: the fused layer's tensors written under the zoo's names."""
    fused_prefix = f"{prefix}{module.fused_name}."
    for key in [k for k in state if k.startswith(fused_prefix)]:
        tensor, leaf = state.pop(key), key[len(fused_prefix):]
        for name, part in zip(module.fused_names, tensor.split(module.fused_sizes), strict=True):
            state[f"{prefix}{name}.{leaf}"] = part


def _stack_state(module, state, prefix, *_args) -> None:
    """load_state_dict pre-hook: the zoo's separate tensors stacked into the fused layer's."""
    for leaf in getattr(module, module.fused_name).state_dict():
        keys = [f"{prefix}{name}.{leaf}" for name in module.fused_names]
        if all(k in state for k in keys):
            state[f"{prefix}{module.fused_name}.{leaf}"] = torch.cat([state.pop(k) for k in keys])
