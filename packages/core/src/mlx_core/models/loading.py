"""``load_model`` / ``save_model``: HF-format directories in and out, validated tensor by tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from mlx_core import registry
from mlx_core.checkpoint_numpy import check_tensors
from mlx_core.config import ModelConfig
from mlx_core.models.checkpoint import hf_to_ours, ours_to_hf, read_safetensors, write_safetensors
from mlx_core.paths import atomic_directory
from mlx_core.plugins import load_plugins
from mlx_core.sources import resolve_model_dir
from mlx_core.transforms.fast_linear import uncopied_mlp_outputs

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt",
                    "tokenizer.model")


def build_model(config: ModelConfig, *, dtype=torch.float32, device="cpu", init: bool = True) -> nn.Module:
    """A randomly initialised model for ``config`` from the architecture registry."""
    load_plugins()
    builder = registry.architectures.get(config.model_type)
    if "torch" not in builder:
        raise ValueError(f"architecture {config.model_type!r} has no torch implementation")
    with torch.device(device):
        model = builder["torch"](config)
    if init:
        model.reset_parameters()
    return model.to(dtype)


def load_model(source: str | Path, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", quantization: str | None = None) -> nn.Module:
    """Load a registered model name, an HF-format directory or a ``.gguf`` file.

    Returns the zoo ``Transformer`` in eval mode with ``model.source_dir`` set to the HF
    directory the weights came from, its MLPs' gate/up outputs allowed out uncopied
    (``mlx_core.transforms.uncopied_mlp_outputs``: the same values, a faster layout).
    ``quantization`` (``"int8"``, ``"int4"``, ``"int4-g64"``, ``"w8a8"``, ...:
    ``mlx_core.transforms.quantize``) quantizes it as it loads; ``"gguf"`` loads a GGUF source's
    quantized tensors as they are shipped (Q4_0, Q4_1, Q4_K -> int4 in groups of 32; Q8_0,
    Q5_0 -> int8 in groups of 32, Q6_K in groups of 16), with no full-precision copy of them.
    """
    if quantization is not None:  # a bad scheme fails before any weights are read
        from mlx_core.transforms import parse_scheme

        if parse_scheme(quantization).name == "gguf":
            return _load_gguf_as_shipped(source, dtype, device)
    load_plugins()
    directory = resolve_model_dir(source)
    config = ModelConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = registry.architectures.get(config.model_type)["torch"](config)
    saved = _saved_quantization(directory)
    if saved is not None:
        return _load_quantized_dir(model, directory, saved, quantization, dtype, device)
    state = hf_to_ours(config, read_safetensors(directory))
    _check_state(model, state, directory)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.source_dir = directory
    uncopied_mlp_outputs(model)
    if quantization is not None:
        from mlx_core.transforms import quantize

        quantize(model.eval(), quantization, calibration=_calibration(quantization, directory))
    return model.eval()


def _calibration(scheme: str, directory: Path):
    """W8A8's SmoothQuant calibration: the shipped text in the model's own tokens (None for the
    other schemes, or where the directory has no tokenizer)."""
    from mlx_core.transforms import parse_scheme

    if parse_scheme(scheme).name != "w8a8":
        return None
    from mlx_core.tokenizer import load_tokenizer
    from mlx_core.transforms.smoothquant import default_calibration

    try:
        tokenizer = load_tokenizer(directory)
    except (OSError, ValueError):
        return None
    return default_calibration(tokenizer)


# config.json's "quantization_config" for a checkpoint of mlx's quantized layers (our tensor names)
QUANT_METHOD = "mlx"


def _saved_quantization(directory: Path) -> dict | None:
    """The "quantization_config" of a quantized checkpoint mlx reads (its own, or
    compressed-tensors), or None for full precision."""
    from mlx_core.transforms import compressed_tensors

    found = json.loads((directory / "config.json").read_text()).get("quantization_config")
    if found is None:
        return None
    method = found.get("quant_method")
    if method not in (QUANT_METHOD, compressed_tensors.QUANT_METHOD):
        raise ValueError(f"{directory} holds weights quantized by {method!r}, which mlx does not "
                         f"read yet; it reads its own ({QUANT_METHOD!r}, from save_model or `mlx "
                         "models quantize`), int8 / W8A8 compressed-tensors checkpoints and GGUF "
                         "files (quantization='gguf')")
    return found


def _dtype_for(name: str, floating: bool, dtype: torch.dtype) -> torch.dtype | None:
    """The model's dtype for its full-precision tensors; quantization parameters (scales, mins)
    keep the dtype they were stored in."""
    return dtype if floating and name.endswith((".weight", ".bias")) else None


def _load_quantized_dir(model, directory, saved, asked, dtype, device) -> nn.Module:
    from mlx_core.transforms import compressed_tensors
    from mlx_core.transforms.quantize import load_quantized_state

    theirs = saved["quant_method"] == compressed_tensors.QUANT_METHOD
    scheme = compressed_tensors.read_scheme(saved, directory) if theirs else saved["scheme"]
    if asked is not None and asked != scheme:
        raise ValueError(f"{directory} is quantized with {scheme} already; load it with "
                         f"quantization=None (or {scheme!r}), or quantize its full-precision source")
    tensors = read_safetensors(directory)
    if theirs:
        tensors = compressed_tensors.mlx_state(tensors, model.config, directory)
    state = {k: v.to(device=device, dtype=_dtype_for(k, v.is_floating_point(), dtype))
             for k, v in tensors.items()}
    load_quantized_state(model, state, scheme)
    model.tie_weights()  # a full-precision head tied to a full-precision embedding
    model.source_dir = directory
    return uncopied_mlp_outputs(model).eval()


def _load_gguf_as_shipped(source, dtype, device) -> nn.Module:
    from mlx_core.gguf_blocks import read_gguf_blocks
    from mlx_core.sources import gguf_file
    from mlx_core.transforms.quantize import load_quantized_state

    load_plugins()
    path = gguf_file(source)
    read = read_gguf_blocks(path)
    config = ModelConfig.from_hf_config(read.hf_config)
    with torch.device("meta"):
        model = registry.architectures.get(config.model_type)["torch"](config)
    state = {k: torch.from_numpy(v).to(device=device, dtype=_dtype_for(k, v.dtype.kind == "f", dtype))
             for k, v in read.tensors.items()}
    load_quantized_state(model, state, "gguf")
    # the tokenizer files (and a converted copy for full-precision use) live in the HF directory
    model.source_dir = resolve_model_dir(source)
    model.gguf_path = path
    return uncopied_mlp_outputs(model).eval()


def _check_state(model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)  # some writers save the tied copy too
    check_tensors(expected, {k: tuple(v.shape) for k, v in state.items()}, where=str(directory),
                  model_type=model.config.model_type)


def save_model(model: nn.Module, directory: str | Path, *, tokenizer=None, overwrite: bool = False,
               max_shard_size: int | None = None) -> Path:
    """Write ``model`` as an HF-format directory that transformers loads as it is.

    A quantized model keeps its quantized tensors, and ``load_model`` reads it back computing
    what it computed. ``int8`` and ``w8a8`` (Llama family, Mixtral) are written as
    compressed-tensors checkpoints (``"quant_method": "compressed-tensors"``, which transformers
    and vLLM read; ``mlx_core.transforms.compressed_tensors``: the int8 table and LM head as
    their de-quantized values in fp32, the head in ``ignore``). ``int4``, ``gguf`` and GPT-2
    models, which compressed-tensors cannot hold, keep mlx's own form: our layers' buffers under
    the zoo's names and ``{"quant_method": "mlx", "scheme": ...}`` (transformers refuses it).

    Tokenizer files come from ``tokenizer`` (an ``mlx_core.Tokenizer`` or HF tokenizer) or, if
    None, are copied from the directory the model was loaded from. The write is atomic: on any
    failure ``directory`` is left as it was.
    """
    from mlx_core.transforms import compressed_tensors

    config: ModelConfig = model.config
    state = dict(model.state_dict())
    hf = config.to_hf_config()
    scheme = getattr(model, "quantization", None)
    if compressed_tensors.writes(model):
        hf["quantization_config"], state = compressed_tensors.checkpoint(model)
    elif scheme is not None:  # our layers' tensors under our names, the scheme in config.json
        hf["quantization_config"] = {"quant_method": QUANT_METHOD, "scheme": scheme}
        if config.tie_word_embeddings:  # the head is the table's tensors: rebuilt on load
            state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
    else:
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        state = ours_to_hf(config, state)
    directory = Path(directory)
    with atomic_directory(directory, overwrite=overwrite) as out:
        (out / "config.json").write_text(json.dumps(hf, indent=2))
        write_safetensors(out, state, max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        elif (src := getattr(model, "source_dir", None)) is not None:
            for name in _TOKENIZER_FILES:
                if (Path(src) / name).is_file():
                    shutil.copy2(Path(src) / name, out / name)
    return directory
