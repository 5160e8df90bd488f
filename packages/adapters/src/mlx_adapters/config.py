"""Adapter configs by method: ``adapter_config.json`` read into the config class of the method
its ``peft_type`` names (the registry's adapter methods). The shared fields and LoRA's config
are torch-free, in ``mlx_core.peft_config``."""

from __future__ import annotations

from pathlib import Path

from mlx_core.peft_config import PeftConfig, read_config_json


def load_config(directory: str | Path) -> PeftConfig:
    from mlx_core import registry
    from mlx_core.plugins import load_plugins

    load_plugins()
    data = read_config_json(directory)
    method = str(data.get("peft_type", "")).lower()
    return registry.adapter_methods.get(method).config_class.from_dict(data)
