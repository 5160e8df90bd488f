"""``modules_to_save``: whole modules (e.g. a classification head) trained and saved in full
next to an adapter. PEFT's layout: ``<module>.original_module`` and
``<module>.modules_to_save.<adapter>``, saved under the module's own name."""

from __future__ import annotations

import copy

from torch import nn

from mlx_adapters.layer import wrapped_targets
from mlx_core.peft_rules import module_matches


class ModulesToSaveWrapper(nn.Module):
    tables = ("modules_to_save",)

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False

    def add(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def delete(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def active_module(self) -> nn.Module:
        active = [n for n in self.active_adapters if n in self.modules_to_save]
        return self.original_module if self.disabled or not active else self.modules_to_save[active[0]]

    def forward(self, *args, **kwargs):
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # e.g. ``model.lm_head.weight`` for tied embeddings
            return getattr(self.active_module(), name)


def wrap_modules_to_save(model: nn.Module, patterns: list[str], adapter_name: str) -> None:
    """Wrap (once) each module whose name is or ends with one of ``patterns``; give it a
    trainable copy for ``adapter_name``."""
    targets = [n for n, _ in model.named_modules() if module_matches(n, patterns)]
    if not targets:
        names = sorted({n.split(".")[-1] for n, _ in model.named_modules() if n})
        raise ValueError(f"modules_to_save={patterns} matches no module; module names include: "
                         f"{', '.join(names[:40])}")
    for _, wrapper in wrapped_targets(model, targets, ModulesToSaveWrapper,
                                      lambda _, m: ModulesToSaveWrapper(m)):
        wrapper.add(adapter_name)
