"""Multi-LoRA serving: PEFT-format LoRA adapters live in slots of stacked A/B tensors inside the
targeted linear layers; every token row of the packed batch names its slot, so requests for
different adapters and for the base model share one forward (the base layer, fp32 or quantized,
then ``mlx_kernels.add_lora_multi``).

An adapter is loaded by name from a PEFT directory (``adapter_config.json`` +
``adapter_model.safetensors``), and can be unloaded when no request uses it. Ranks below
``max_lora_rank`` are zero-padded, which adds nothing to the product.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mlx_core.peft_rules import WEIGHTS_NAME, parse_lora_key
from mlx_core.transforms import QuantizedLinear, unfuse_projections
from mlx_kernels import add_lora_multi

# what the refusals below point to: a command of mlx-adapters, which serving does not need
MERGE = "`mlx adapters merge` (pip install mlx-adapters)"


class LoraBatch:
    """The current forward's token-to-slot map, shared by every wrapped layer."""

    def __init__(self):
        self.token_slots: torch.Tensor | None = None  # [tokens] int, -1 = base model
        self.slots: frozenset[int] = frozenset()  # slots present in this batch


class MultiLoraLinear(nn.Module):
    """``base(x)`` plus, for each row, ``scaling[s] * B[s] A[s] x`` of the row's slot ``s``.
    The base is an ``nn.Linear`` or a quantized linear layer (``mlx_core.transforms``): the
    adapters stay in the model's compute dtype either way."""

    def __init__(self, base: nn.Module, max_loras: int, max_rank: int, batch: LoraBatch,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.base = base
        self.batch = batch
        zeros = functools.partial(torch.zeros, dtype=dtype, device=device)
        self.register_buffer("lora_a", zeros(max_loras, max_rank, base.in_features))
        self.register_buffer("lora_b", zeros(max_loras, base.out_features, max_rank))
        self.register_buffer("scalings", zeros(max_loras))
        self.loaded: set[int] = set()  # slots whose adapter targets this layer

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        r = a.shape[0]
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.lora_a[slot, :r] = a
        self.lora_b[slot, :, :r] = b
        self.scalings[slot] = scaling
        self.loaded.add(slot)

    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.scalings[slot] = 0
        self.loaded.discard(slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.batch
        if batch.token_slots is None or not (batch.slots & self.loaded):
            return self.base(x)
        slots = batch.token_slots
        if batch.slots - self.loaded:  # rows whose adapter does not target this layer: base only
            mine = torch.zeros(self.lora_a.shape[0] + 1, dtype=torch.bool, device=slots.device)
            mine[list(self.loaded)] = True
            slots = torch.where(mine[slots], slots, -1)  # index -1 reads the spare False entry
        flat = x.reshape(-1, x.shape[-1])
        out = add_lora_multi(flat, self.base(flat), self.lora_a, self.lora_b, slots, self.scalings)
        return out.reshape(*x.shape[:-1], out.shape[-1])


@dataclass
class LoadedLora:
    name: str
    path: str
    slot: int
    lora_id: int  # unique per load: a reloaded name never hits the old adapter's cached prefixes
    rank: int
    modules: list[str] = field(default_factory=list)


class LoraManager:
    """Names -> slots; wraps the targeted layers of ``model`` on first use."""

    _ids = itertools.count(1)

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int):
        if max_loras < 1 or max_rank < 1:
            raise ValueError(f"max_loras and max_lora_rank must be >= 1 (got {max_loras}, "
                             f"{max_rank})")
        self.model = model
        self.max_loras, self.max_rank = max_loras, max_rank
        self.batch = LoraBatch()
        self.adapters: dict[str, LoadedLora] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.adapters

    def names(self) -> list[str]:
        return list(self.adapters)

    def load(self, name: str, path: str | Path) -> LoadedLora:
        """Read a PEFT LoRA directory into a free slot; raises with the reason if it cannot."""
        if not name or not isinstance(name, str):
            raise ValueError("an adapter needs a non-empty name")
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded; unload it first or "
                             "choose another name")
        free = sorted(set(range(self.max_loras)) - {a.slot for a in self.adapters.values()})
        if not free:
            raise ValueError(f"all {self.max_loras} LoRA slots are in use "
                             f"({', '.join(self.adapters)}): unload one or raise max_loras")
        config, tensors = _read_adapter(Path(path))
        pairs = _pair_tensors(tensors, path)
        # an adapter's layers are the zoo's separate projections: split the fused ones it reads
        unfuse_projections(self.model, {m.rpartition(".")[0] for m in pairs})
        modules = dict(self.model.named_modules())
        # tensor parallelism: this rank's share of each cut layer takes that share of the
        # adapter (lora_B's rows of a column-parallel layer, lora_A's columns of a row-parallel
        # one; the row-parallel outputs, adapter included, are summed across ranks)
        shares = getattr(getattr(self.model, "tensor_parallel", None), "shares", {})
        rank = 0
        plan = []
        for module_name, (a, b) in sorted(pairs.items()):
            if module_name in shares:
                side, lo, hi = shares[module_name]
                a, b = (a, b[lo:hi]) if side == "out" else (a[:, lo:hi], b)
            layer = modules.get(module_name)
            if not isinstance(layer, (nn.Linear, QuantizedLinear, MultiLoraLinear)):
                kind = "no such module" if layer is None else type(layer).__name__
                raise ValueError(f"adapter {name!r} targets {module_name} ({kind}); serving "
                                 "applies LoRA to the model's linear layers only")
            base = layer.base if isinstance(layer, MultiLoraLinear) else layer
            if module_name.split(".")[-1] == "kv_b_proj":
                raise ValueError(f"adapter {name!r} targets {module_name}, which serving folds "
                                 "into multi-head latent attention's queries and outputs (the "
                                 f"paged cache holds the latent): merge it into the model with "
                                 f"{MERGE}")
            if module_name.split(".")[-1] == "lm_head":
                raise ValueError(f"adapter {name!r} targets lm_head, which serving does not "
                                 f"support: merge it into the model with {MERGE}")
            if a.shape[1] != base.in_features or b.shape[0] != base.out_features \
                    or a.shape[0] != b.shape[1]:
                raise ValueError(f"adapter {name!r}: {module_name} has lora_A {tuple(a.shape)} "
                                 f"and lora_B {tuple(b.shape)}, but the layer is "
                                 f"{base.in_features} -> {base.out_features} (another base model?)")
            r = a.shape[0]
            if r > self.max_rank:
                raise ValueError(f"adapter {name!r} has rank {r} at {module_name}, above "
                                 f"max_lora_rank={self.max_rank}: raise max_lora_rank")
            _, alpha = config.rank_and_alpha(module_name)
            scaling = alpha / (r ** 0.5 if config.use_rslora else r)
            rank = max(rank, r)
            plan.append((module_name, a, b, scaling))
        slot = free[0]
        for module_name, a, b, scaling in plan:
            layer = self._wrapped(module_name)
            like = layer.lora_a
            layer.set_slot(slot, a.to(like.device, like.dtype), b.to(like.device, like.dtype),
                           scaling)
        loaded = LoadedLora(name, str(path), slot, next(self._ids), rank, [m for m, *_ in plan])
        self.adapters[name] = loaded
        return loaded

    def unload(self, name: str) -> None:
        loaded = self.get(name)
        for module_name in loaded.modules:
            self._wrapped(module_name).clear_slot(loaded.slot)
        del self.adapters[name]

    def get(self, name: str) -> LoadedLora:
        if name not in self.adapters:
            known = ", ".join(self.adapters) or "none"
            raise KeyError(f"no LoRA adapter named {name!r} is loaded (loaded: {known})")
        return self.adapters[name]

    def _wrapped(self, module_name: str) -> MultiLoraLinear:
        parent_name, _, child = module_name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        layer = getattr(parent, child)
        if not isinstance(layer, MultiLoraLinear):
            layer = MultiLoraLinear(layer, self.max_loras, self.max_rank, self.batch,
                                    self.model.dtype, self.model.device)
            setattr(parent, child, layer)
        return layer

    def set_batch(self, token_slots: list[int] | None, device) -> None:
        """Before a forward: each token's slot (-1 = base); None when no row uses an adapter."""
        present = frozenset(token_slots or ()) - {-1}
        if not present:
            self.batch.token_slots, self.batch.slots = None, frozenset()
            return
        self.batch.token_slots = torch.tensor(token_slots, dtype=torch.long, device=device)
        self.batch.slots = present


def _read_adapter(path: Path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mlx_core.peft_config import LoraConfig, pissa_iterations, read_config_json

    if not path.is_dir():
        raise FileNotFoundError(f"LoRA adapter directory {path} does not exist")
    data = read_config_json(path)
    kind = str(data.get("peft_type", "")).upper()
    if kind != "LORA":  # AdaLoRA, IA3, prompt learning, ...
        raise ValueError(f"{path} holds a {kind or 'typeless'} adapter; serving loads LoRA "
                         f"adapters only (merge other methods into the model with {MERGE})")
    config = LoraConfig.from_dict(data)
    if config.use_dora:
        raise ValueError(f"{path} is a DoRA adapter, which serving cannot apply per request: "
                         f"merge it into the model with {MERGE} and serve that")
    if config.init_lora_weights == "olora" or pissa_iterations(config.init_lora_weights) is not None:
        raise ValueError(f"{path} is a {config.init_lora_weights!r}-initialised adapter, whose "
                         "weights only hold on its residual base model, not the served one: save "
                         "it converted to plain LoRA (PEFT's path_initial_model_for_weight_conversion)"
                         f" or merge it into the model with {MERGE}")
    if config.bias != "none" or config.lora_bias:
        what = f"bias={config.bias!r}" if config.bias != "none" else "lora_bias=True"
        raise ValueError(f"{path} is a LoRA adapter with {what}, whose trained biases serving "
                         f"cannot apply per request: merge it into the model with {MERGE}")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}")
    try:
        return config, load_file(weights)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read {weights}: it is corrupt or truncated ({e})") from None


def _pair_tensors(tensors: dict, path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = parse_lora_key(key)
        if parsed is None:
            raise ValueError(f"{path}: tensor {key} is not a LoRA A/B weight (modules_to_save and "
                             "embedding LoRA cannot be served per request; merge the adapter)")
        module_name, part = parsed
        found.setdefault(module_name, {})[part] = tensor
    pairs = {}
    for module_name, parts in found.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise ValueError(f"{path}: {module_name} has {sorted(parts)} but needs lora_A and "
                             "lora_B")
        pairs[module_name] = (parts["lora_A"], parts["lora_B"])
    if not pairs:
        raise ValueError(f"{path}: the adapter holds no LoRA weights")
    return pairs
