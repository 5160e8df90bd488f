"""PEFT's adapter files: ``adapter_config.json`` + ``adapter_model.safetensors`` whose keys are
the model's parameter names with the adapter name removed
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mlx_core.paths import atomic_directory

WEIGHTS_NAME = "adapter_model.safetensors"


# How PEFT names each table's entries when saving: "<table>.<adapter>.weight" becomes
# "<table>.weight" (keep), "<table>" (no_weight) or, for whole modules, "weight" (no_table).
_SAVED_TABLES = {"lora_A": "keep", "lora_B": "keep", "lora_magnitude_vector": "no_weight",
                 "ia3_l": "no_weight", "modules_to_save": "no_table"}
_PROMPT = "prompt_encoder.{}.embedding.weight"  # saved whole, as "prompt_embeddings"


def saved_name(name: str, adapter_name: str) -> str | None:
    """PEFT's saved key for one of our parameter names (the adapter's name dropped), or None
    if the parameter is not this adapter's."""
    if name == _PROMPT.format(adapter_name):
        return "prompt_embeddings"
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


def adapter_state(model: nn.Module, adapter_name: str) -> dict:
    """This adapter's tensors under PEFT's saved names."""
    out = {}
    for name, tensor in model.state_dict().items():
        if (key := saved_name(name, adapter_name)) is not None:
            out[key] = tensor.detach().contiguous().cpu()
    return out


def save_adapter_weights(model: nn.Module, adapter_name: str, directory: Path) -> None:
    with atomic_directory(directory, overwrite=True) as out:
        model.peft_config[adapter_name].save(out)
        config = json.loads((out / "adapter_config.json").read_text())
        config["inference_mode"] = True  # PEFT saves adapters in inference mode
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
        save_file(adapter_state(model, adapter_name), out / WEIGHTS_NAME, metadata={"format": "pt"})


def load_adapter_weights(model: nn.Module, adapter_name: str, directory: Path) -> None:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    try:
        saved = load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read {path}: it is corrupt or truncated ({e})") from None
    expected = adapter_state(model, adapter_name)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter in {directory} does not fit this model: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]} (different target modules or base model?)")
    params = {saved_name(n, adapter_name): p for n, p in model.named_parameters()}
    for key, tensor in saved.items():
        target = params[key]
        if tensor.shape != target.shape:
            raise ValueError(f"adapter tensor {key} in {path} has shape {tuple(tensor.shape)}, but "
                             f"this model expects {tuple(target.shape)} (a different base model "
                             "or rank?)")
        target.data.copy_(tensor)
