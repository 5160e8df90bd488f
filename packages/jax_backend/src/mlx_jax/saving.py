"""``save_model``: a Flax model as an HF-format directory that the torch zoo and transformers
load as it is (``config.json`` + ``model.safetensors`` + the tokenizer files it came with)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.numpy import save_file

from mlx_core.checkpoint_numpy import ours_to_hf_numpy
from mlx_core.paths import atomic_directory
from mlx_jax.loading import model_arrays

# The tokenizer files mlx_core's torch save_model copies too (mlx_core.models.loading).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt",
                   "tokenizer.model")


def save_model(model, directory: str | Path, *, tokenizer=None, overwrite: bool = False) -> Path:
    """Write ``model``'s parameters (in their dtype; bf16 stays bf16) and config atomically.

    Tokenizer files come from ``tokenizer`` (an ``mlx_core.Tokenizer`` or HF tokenizer) or, if
    None, are copied from the directory the model was loaded from.
    """
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("this model carries a LoRA adapter: merge it first "
                         "(mlx_jax.lora.merge_lora(model)) to save the merged model, or save the "
                         "adapter alone with mlx_jax.lora.save_lora(model, directory)")
    config = model.config
    directory = Path(directory)
    with atomic_directory(directory, overwrite=overwrite) as out:
        (out / "config.json").write_text(json.dumps(config.to_hf_config(), indent=2))
        tensors = ours_to_hf_numpy(config, model_arrays(model))
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        elif (src := getattr(model, "source_dir", None)) is not None:
            for name in TOKENIZER_FILES:
                if (Path(src) / name).is_file():
                    shutil.copy2(Path(src) / name, out / name)
    return directory
