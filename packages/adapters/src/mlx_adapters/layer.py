"""What every adapter layer shares: the wrapped base layer, which adapters are active, merged
or disabled, and the per-adapter tables whose entries carry the adapter's name (PEFT's layout:
``<module>.<table>.<adapter>``)."""

from __future__ import annotations

import abc

import torch
from torch import nn

from mlx_adapters.nf4_linear import NF4Linear
from mlx_core.transforms import QuantizedLinear

# frozen bases stored quantized: QLoRA's NF4, and mlx_core's int8 / int4 / W8A8 layers; adapters
# train beside them in the compute dtype, and merging first replaces them by full precision
QUANTIZED_BASES = (NF4Linear, QuantizedLinear)


class AdapterLayer(nn.Module, abc.ABC):
    tables: tuple[str, ...] = ()  # attributes (ModuleDict / ParameterDict) keyed by adapter name

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def _device_dtype(self):
        """Where new adapter weights go: the base's device, in its compute dtype."""
        if isinstance(self.base_layer, nn.Linear):
            return self.base_layer.weight.device, self.base_layer.weight.dtype
        return next(self.base_layer.buffers()).device, self.base_layer.compute_dtype

    def base_weight(self) -> torch.Tensor:
        if isinstance(self.base_layer, QUANTIZED_BASES):
            return self.base_layer.dequantized_weight()
        return self.base_layer.weight

    def adapter_names(self) -> list[str]:
        return list(getattr(self, self.tables[0]))

    def pending(self) -> list[str]:
        """Active adapters not merged into the base weight: these run in forward."""
        names = self.adapter_names()
        return [n for n in self.active_adapters if n not in self.merged_adapters and n in names]

    def merge(self, names: list[str], keep_original: bool = True) -> None:
        """Fold ``names`` into the base weight. ``keep_original``: first keep a copy of the base
        layer's tensors, so ``unmerge`` restores them bit for bit (subtracting the delta again
        would not: float addition does not round-trip); ``merge_and_unload`` skips the copy."""
        names = [n for n in names if n not in self.merged_adapters]
        if not names:
            return
        if keep_original and not self.merged_adapters:  # kept off the module tree and state_dict
            object.__setattr__(self, "_original", self._original_tensors())
        if isinstance(self.base_layer, QUANTIZED_BASES):  # merging into 4/8 bits would be lossy
            self.base_layer = self.base_layer.dequantized()
        with torch.no_grad():
            for name in names:
                self._merge_one(name)
                self.merged_adapters.append(name)

    def _original_tensors(self):
        """The base layer itself when merging replaces it (quantized), else clones of its
        tensors."""
        if isinstance(self.base_layer, QUANTIZED_BASES):
            return self.base_layer
        return {k: t.detach().clone() for k, t in self.base_layer.named_parameters(recurse=False)}

    def unmerge(self) -> None:
        with torch.no_grad():
            while self.merged_adapters:  # per-adapter bookkeeping (e.g. DoRA's factors) too
                self._unmerge_one(self.merged_adapters.pop())
            original = self.__dict__.pop("_original", None)
            if isinstance(original, QUANTIZED_BASES):
                self.base_layer = original
            elif original is not None:
                for key, tensor in self.base_layer.named_parameters(recurse=False):
                    tensor.copy_(original[key])

    def delete(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge()
        for table in self.tables:
            entries = getattr(self, table)
            if name in entries:
                del entries[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    @abc.abstractmethod
    def _merge_one(self, name: str) -> None:
        """Fold adapter ``name`` into the base weight (in place, under no_grad)."""

    @abc.abstractmethod
    def _unmerge_one(self, name: str) -> None:
        """Undo ``_merge_one``."""

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names()}, active={self.active_adapters}, merged={self.merged_adapters}"


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` was."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def wrapped_targets(model: nn.Module, targets: list[str], layer_class: type, make):
    """Yield ``(name, layer)`` for each target, wrapping it in ``layer_class`` (built by
    ``make(name, module)``) unless an earlier adapter already did."""
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, layer_class):
            module = make(name, module)
            replace_module(model, name, module)
        yield name, module
