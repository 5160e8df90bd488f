"""PEFT's adapter files: ``adapter_config.json`` + ``adapter_model.safetensors`` whose keys are
the model's parameter names with the adapter name removed
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mlx_core.paths import atomic_directory
from mlx_core.peft_rules import WEIGHTS_NAME

# How PEFT names each table's entries when saving: "<table>.<adapter>.weight" becomes
# "<table>.weight" (keep; an entry that is itself a parameter, "<table>.<adapter>", becomes
# "<table>"), "<table>" (no_weight) or, for whole modules, "weight" (no_table).
_SAVED_TABLES = {"lora_A": "keep", "lora_B": "keep", "lora_E": "keep", "lora_magnitude_vector": "no_weight",
                 "ia3_l": "no_weight", "modules_to_save": "no_table"}
# Per-adapter entries that are never saved, and the prompt-learning encoders (saved whole).
_UNSAVED_TABLES = {"ranknum", "prompt_encoder"}
PROMPT_KEY = "prompt_embeddings"


def saved_name(name: str, adapter_name: str) -> str | None:
    """PEFT's saved key for one of our parameter names (the adapter's name dropped), or None
    if the parameter is not this adapter's."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in _SAVED_TABLES and parts[i + 1] == adapter_name:
            head, rest = parts[:i + 1], parts[i + 2:]
            if _SAVED_TABLES[part] == "no_weight" and rest == ["weight"]:
                rest = []
            if _SAVED_TABLES[part] == "no_table":
                head = parts[:i]
            return ".".join(head + rest)
    return None


def bias_names(model: nn.Module, mode: str) -> list[str]:
    """The base-model biases that an adapter of ``bias="all"`` (every bias outside the adapter
    tables) or ``"lora_only"`` (the wrapped layers' biases) trains and saves, by name."""
    from mlx_adapters.layer import AdapterLayer

    if mode == "all":
        tables = set(_SAVED_TABLES) | _UNSAVED_TABLES
        return [n for n, _ in model.named_parameters()
                if n.endswith(".bias") and not tables & set(n.split(".")[:-1])]
    if mode == "lora_only":
        return [f"{n}.base_layer.bias" for n, m in model.named_modules()
                if isinstance(m, AdapterLayer) and getattr(m.base_layer, "bias", None) is not None]
    return []


def _live_tensors(model: nn.Module, adapter_name: str) -> dict:
    """This adapter's saved key -> the model's own tensor (parameter or buffer)."""
    state = model.state_dict(keep_vars=True)
    out = {key: tensor for name, tensor in state.items()
           if (key := saved_name(name, adapter_name)) is not None}
    mode = getattr(model.peft_config[adapter_name], "bias", "none")
    out.update({name: state[name] for name in bias_names(model, mode)})
    return out


def adapter_state(model: nn.Module, adapter_name: str) -> dict:
    """This adapter's tensors under PEFT's saved names."""
    out = {key: t.detach().contiguous().cpu() for key, t in _live_tensors(model, adapter_name).items()}
    if adapter_name in getattr(model, "prompt_encoder", {}):
        out[PROMPT_KEY] = model.prompt_encoder[adapter_name].embeddings_to_save().detach().contiguous().cpu()
    method = _method_of(model, adapter_name)
    if hasattr(method, "saved_state"):
        out = method.saved_state(model, adapter_name, out)
    return out


def _method_of(model: nn.Module, adapter_name: str):
    from mlx_core import registry

    return registry.adapter_methods.get(model.peft_config[adapter_name].peft_type.lower())


def save_adapter_weights(model: nn.Module, adapter_name: str, directory: Path,
                         config=None, tensors: dict | None = None) -> None:
    """Write the adapter (or the given ``config`` and ``tensors`` in its place) atomically."""
    config = model.peft_config[adapter_name] if config is None else config
    tensors = adapter_state(model, adapter_name) if tensors is None else tensors
    with atomic_directory(directory, overwrite=True) as out:
        config.save(out)
        data = json.loads((out / "adapter_config.json").read_text())
        data["inference_mode"] = True  # PEFT saves adapters in inference mode
        (out / "adapter_config.json").write_text(json.dumps(data, indent=2))
        save_file(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})


def load_adapter_weights(model: nn.Module, adapter_name: str, directory: Path) -> None:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    try:
        saved = load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read {path}: it is corrupt or truncated ({e})") from None
    method = _method_of(model, adapter_name)
    if hasattr(method, "prepare_load"):  # e.g. AdaLoRA: shrink the layers to the saved ranks
        method.prepare_load(model, adapter_name)
    targets = _live_tensors(model, adapter_name)
    encoders = getattr(model, "prompt_encoder", {})
    encoder = encoders[adapter_name] if adapter_name in encoders else None
    expected = set(targets) | ({PROMPT_KEY} if encoder is not None else set())
    missing = sorted(expected - set(saved))
    unexpected = sorted(set(saved) - expected)
    if missing or unexpected:
        raise ValueError(f"adapter in {directory} does not fit this model: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]} (different target modules or base model?)")
    shapes = {key: tuple(t.shape) for key, t in targets.items()}
    if encoder is not None:
        shapes[PROMPT_KEY] = tuple(encoder.saved_shape())
    for key, tensor in saved.items():
        if tuple(tensor.shape) != shapes[key]:
            raise ValueError(f"adapter tensor {key} in {path} has shape {tuple(tensor.shape)}, but "
                             f"this model expects {shapes[key]} (a different base model or rank?)")
    with torch.no_grad():
        for key, tensor in saved.items():
            if key == PROMPT_KEY:
                encoder.load_prompt_embeddings(tensor)
            else:
                targets[key].copy_(tensor)
