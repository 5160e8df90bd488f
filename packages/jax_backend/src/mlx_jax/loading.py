"""``load_model`` / ``build_model``: HF-format weights into the Flax model, with no torch.

The model is built abstractly (``nnx.eval_shape``: shapes only, no memory, no random init),
its flattened state paths are the zoo's parameter names, and the checkpoint fills them through
a strict map: any missing, unexpected or mis-shaped tensor raises, naming it.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlx_core import registry
from mlx_core.checkpoint_numpy import check_tensors, hf_to_ours_numpy, read_safetensors_numpy
from mlx_core.config import ModelConfig
from mlx_core.plugins import load_plugins
from mlx_core.sources import resolve_model_dir


def _builder(config: ModelConfig):
    load_plugins()
    builders = registry.architectures.get(config.model_type)
    if "flax" not in builders:
        raise ValueError(f"architecture {config.model_type!r} has no flax implementation "
                         f"(backends: {sorted(builders)})")
    return builders["flax"]


def build_model(config: ModelConfig, *, dtype=jnp.float32, seed: int = 0) -> nnx.Module:
    """A randomly initialised model for ``config`` from the architecture registry."""
    return _builder(config)(config, dtype=dtype, rngs=nnx.Rngs(seed))


def param_name(path: tuple) -> str:
    """An NNX state path -> the zoo's dotted name (``('model', 'layers', 0, ...)`` -> ``model.layers.0...``)."""
    return ".".join(str(p) for p in path)


def load_model(source: str | Path, *, dtype=jnp.float32) -> nnx.Module:
    """Load a registered model name, an HF-format directory or a ``.gguf`` file.

    Returns the Flax ``Transformer`` with ``model.source_dir`` set to the HF directory the
    weights came from. ``dtype`` is the parameter (and compute) dtype.
    """
    directory = resolve_model_dir(source)
    config = ModelConfig.from_pretrained(directory)
    arrays = hf_to_ours_numpy(config, read_safetensors_numpy(directory))
    model = model_from_arrays(config, arrays, where=str(directory), dtype=dtype)
    model.source_dir = Path(directory)
    return model


def model_from_arrays(config: ModelConfig, arrays: dict[str, np.ndarray], *, where: str,
                      dtype=jnp.float32) -> nnx.Module:
    """The Flax model for ``config`` with ``arrays`` (zoo names -> numpy, e.g. a torch model's
    state dict) as its parameters, strictly by name and shape (``where`` names their source in
    errors); built abstractly, so no random initialisation runs."""
    builder = _builder(config)
    abstract = nnx.eval_shape(lambda: builder(config, dtype=dtype, rngs=nnx.Rngs(0)))
    return fill_params(abstract, arrays, where=where)


def fill_params(abstract: nnx.Module, arrays: dict[str, np.ndarray], *, where: str) -> nnx.Module:
    """Merge ``arrays`` (zoo names -> numpy) into an abstract model, strictly by name and shape."""
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    expected = {param_name(path): tuple(var.get_value().shape) for path, var in flat}
    arrays = dict(arrays)
    if abstract.config.tie_word_embeddings:
        arrays.pop("lm_head.weight", None)  # some writers save the tied copy too
    check_tensors(expected, {name: tuple(a.shape) for name, a in arrays.items()}, where=where,
                  model_type=abstract.config.model_type)
    filled = [(path, var.replace(jnp.asarray(arrays[param_name(path)], dtype=var.get_value().dtype)))
              for path, var in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def model_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters as numpy arrays under the zoo's names."""
    _, state = nnx.split(model)
    return {param_name(path): np.asarray(var.get_value()) for path, var in nnx.to_flat_state(state)}
