"""int8 and W8A8 checkpoints in the compressed-tensors format (what HF transformers and vLLM read).

mlx writes and reads the format itself; the ``compressed-tensors`` package is not needed (the
tests use it as the reference). The forms, as llm-compressor writes them:

- ``w8a8`` -> format ``int-quantized``: ``NAME.weight`` int8 ``[N, K]`` and ``NAME.weight_scale``
  ``[N, 1]``; weights int8, symmetric, per output channel; input activations int8, symmetric,
  per token, dynamic (no activation tensors).
- ``int8`` -> format ``pack-quantized`` (vLLM reads int8 weight-only in this format only):
  ``NAME.weight_packed`` int32 ``[N, K / 4]`` (four values a word, value + 128 in byte ``i`` of
  the word, little end first), ``NAME.weight_shape`` int64 ``[N, K]``, ``NAME.weight_scale``.

Readers quantize only linear layers (vLLM neither its LM head nor its embedding), so mlx's int8
token table and LM head are written as their de-quantized values in full precision with the head
listed in ``ignore``: HF and vLLM compute with exactly the weights mlx computes with. On load a
table or head whose values lie exactly on an int8 per-row grid becomes int8 again, bit for bit
(``quantize_int8`` of de-quantized values gives back the same int8 values and scales); one from
another tool, in full precision, stays as it is. MoE routers stay in full precision, in
``ignore``. int4 (groups with a float minimum) has no compressed-tensors form that runs it
exactly and stays in mlx's own form, as does GPT-2 (HF keeps its linears in ``Conv1D``
modules, which compressed-tensors does not quantize).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mlx_core.models.checkpoint import hf_to_ours, ours_to_hf
from mlx_core.transforms.quantize import Int8Linear, QuantizedEmbedding, QuantizedLinear
from mlx_kernels import quantized_linear as ql

QUANT_METHOD = "compressed-tensors"
_WEIGHTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
            "group_size": None, "dynamic": False}
_TOKENS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
           "group_size": None, "dynamic": True}
_FORMATS = {"w8a8": "int-quantized", "int8": "pack-quantized"}
# formats that store int8 weights as they are (``weight``) or packed (``weight_packed``)
_READ_FORMATS = ("int-quantized", "naive-quantized", "pack-quantized")
# the full-precision layers a reader may keep that mlx's schemes quantize
_EMBEDDING, _HEAD = "model.embed_tokens", "lm_head"


def writes(model: nn.Module) -> bool:
    """Whether ``save_model`` writes ``model`` in this format (else in mlx's own)."""
    return (getattr(model, "quantization", None) in _FORMATS
            and model.config.model_type != "gpt2")


def checkpoint(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(quantization_config, tensors)`` under HF's names for an int8 or W8A8 model."""
    scheme, config = model.quantization, model.config
    state = dict(model.state_dict())
    ignore = []
    for name, layer in model.named_modules():
        if isinstance(layer, QuantizedEmbedding) or name == _HEAD:
            # readers run these in full precision: written as the values mlx computes with
            for key in ("qweight", "scale"):
                state.pop(f"{name}.{key}", None)
            if name == _HEAD:
                ignore.append(name)
            if name == _HEAD and config.tie_word_embeddings:
                state.pop(f"{name}.weight", None)  # readers tie it to the embedding
            elif isinstance(layer, (QuantizedEmbedding, QuantizedLinear)):
                state[f"{name}.weight"] = ql.dequantize_int8(layer.qweight, layer.scale)
        elif isinstance(layer, Int8Linear) and layer.scale.dim() == 1:
            q, scale = state.pop(f"{name}.qweight"), state.pop(f"{name}.scale")
            state[f"{name}.weight_scale"] = scale.float()[:, None]
            if scheme == "w8a8":
                state[f"{name}.weight"] = q
            else:
                state[f"{name}.weight_packed"] = pack_int8(q)
                state[f"{name}.weight_shape"] = torch.tensor(q.shape, dtype=torch.int64)
        elif isinstance(layer, QuantizedLinear):
            raise ValueError(f"{name} is {layer.scheme} with a scale per group, which the "
                             f"compressed-tensors form of {scheme} does not hold")
        elif isinstance(layer, nn.Linear):
            ignore.append(name)  # full precision (MoE routers)
    group = {"targets": ["Linear"], "weights": dict(_WEIGHTS),
             "input_activations": dict(_TOKENS) if scheme == "w8a8" else None,
             "output_activations": None, "format": _FORMATS[scheme]}
    quantization_config = {
        "quant_method": QUANT_METHOD, "format": _FORMATS[scheme],
        "quantization_status": "compressed", "config_groups": {"group_0": group},
        "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None,
    }
    return quantization_config, ours_to_hf(config, state)


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 ``[N, K]`` -> int32 ``[N, ceil(K / 4)]``: value ``4j + i`` of a row, plus 128, in
    bits ``8i..8i+7`` of word ``j`` (compressed-tensors' ``pack_to_int32`` for 8 bits)."""
    n, k = q.shape
    u = (q.to(torch.int64) + 128)
    u = torch.nn.functional.pad(u, (0, -k % 4)).view(n, -1, 4)
    words = u[..., 0] | (u[..., 1] << 8) | (u[..., 2] << 16) | (u[..., 3] << 24)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int8(packed: torch.Tensor, shape) -> torch.Tensor:
    """The int8 ``[N, K]`` that ``pack_int8`` packed."""
    n, k = (int(d) for d in shape)
    shifts = torch.arange(0, 32, 8, dtype=torch.int32)
    u = (packed[..., None] >> shifts) & 0xFF  # arithmetic shift; the mask keeps one byte
    return (u.reshape(n, -1)[:, :k] - 128).to(torch.int8)


def read_scheme(quantization_config: dict, source: Path | str) -> str:
    """``"w8a8"`` or ``"int8"`` for a compressed-tensors config mlx runs exactly, else one
    ValueError naming what the checkpoint holds and what mlx reads."""
    found, schemes = [], set()
    for key in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if quantization_config.get(key):
            found.append(f"{key.replace('_', ' ')} {quantization_config[key]}")
    groups = quantization_config.get("config_groups") or {}
    if not groups:
        found.append("no config_groups")
    for name, group in groups.items():
        if isinstance(group, list):  # a preset's name with its targets
            if name.upper() not in ("W8A8", "INT8"):
                found.append(f"preset scheme {name!r}")
                continue
            group = {"weights": dict(_WEIGHTS), "input_activations": dict(_TOKENS)}
        group_format = group.get("format") or quantization_config.get("format")
        weights, inputs = group.get("weights"), group.get("input_activations")
        parts = []
        if group_format not in _READ_FORMATS:
            parts.append(f"format {group_format!r}")
        if weights is None or not _is_int8_weights(_normalized(weights)):
            parts.append(f"weights {_describe(weights)}")
        elif weights.get("actorder") not in (None, "weight", "static"):
            parts.append(f"activation ordering {weights['actorder']!r}")
        if inputs is not None and _normalized(inputs) != _TOKENS:
            parts.append(f"input activations {_describe(inputs)}")
        if group.get("output_activations") is not None:
            parts.append(f"output activations {_describe(group['output_activations'])}")
        if parts:
            found.append(f"group {name!r}: " + ", ".join(parts))
        schemes.add("int8" if inputs is None else "w8a8")
    if not found and len(schemes) > 1:
        found.append("int8 weight-only and W8A8 groups in one model")
    if found:
        raise ValueError(
            f"{source} is a compressed-tensors checkpoint that mlx cannot run exactly: "
            + "; ".join(found) + ". mlx reads int8 weights (symmetric, static, one scale per "
            "output channel or per tensor), weight-only (its int8) or with int8 activations per "
            "token, symmetric, dynamic (its w8a8), in the formats " + ", ".join(_READ_FORMATS))
    return schemes.pop()


def _normalized(args: dict) -> dict:
    """The fields of a QuantizationArgs that decide what it computes, with compressed-tensors'
    defaults filled in (the strategy follows from group_size where it is not given)."""
    got = {k: v for k, v in args.items() if v is not None}
    size = got.get("group_size")
    strategy = got.get("strategy") or {None: "tensor", -1: "channel"}.get(size, "group")
    return {"num_bits": got.get("num_bits", 8), "type": got.get("type", "int"),
            "symmetric": got.get("symmetric", True), "strategy": strategy,
            "group_size": size if strategy == "group" else None,
            "dynamic": got.get("dynamic", False)}


def _is_int8_weights(args: dict) -> bool:
    # one scale per tensor is the per-channel layout with every scale equal
    return {**args, "strategy": "channel" if args["strategy"] == "tensor" else args["strategy"]} \
        == _WEIGHTS


def _describe(args: dict | None) -> str:
    if args is None:
        return "not quantized"
    a = _normalized(args)
    strategy = a["strategy"] + (f" of {a['group_size']}" if a["group_size"] else "")
    return (f"{a['type']}{a['num_bits']} per {strategy}, "
            f"{'symmetric' if a['symmetric'] else 'asymmetric'}, "
            f"{'dynamic' if a['dynamic'] else 'static'}")


def mlx_state(tensors: dict[str, torch.Tensor], config, source: Path | str
              ) -> dict[str, torch.Tensor]:
    """A compressed-tensors checkpoint's tensors (HF names) as mlx's quantized state, our
    names (``NAME.qweight`` + ``NAME.scale``, for ``load_quantized_state``). The int8 weights
    are taken as they are (unpacked where packed); no full-precision copy of them is made."""
    if config.model_type == "gpt2":
        raise ValueError(f"{source}: mlx reads compressed-tensors checkpoints of the Llama "
                         "family and Mixtral, not gpt2 (HF's GPT-2 linears are Conv1D)")
    state = hf_to_ours(config, tensors)
    for key in [k for k in state if k.endswith(".weight_scale")]:
        name = key.removesuffix(".weight_scale")
        scale = state.pop(key)
        zero = state.pop(f"{name}.weight_zero_point", None)
        if zero is not None and bool(zero.any()):
            raise ValueError(f"{source}: {name} has a nonzero weight_zero_point, but its "
                             "config says symmetric")
        if f"{name}.weight_packed" in state:
            q = unpack_int8(state.pop(f"{name}.weight_packed"), state.pop(f"{name}.weight_shape"))
        else:
            q = state.pop(f"{name}.weight")
        if q.dtype != torch.int8:
            raise ValueError(f"{source}: {name} has a weight_scale but a {q.dtype} weight; "
                             "mlx reads int8 weights")
        state[f"{name}.qweight"] = q
        state[f"{name}.scale"] = scale.float().reshape(-1).expand(q.shape[0]).contiguous()
    tied = config.tie_word_embeddings
    if tied:
        state.pop(f"{_HEAD}.weight", None)  # some writers save the tied copy too
    for name in (_EMBEDDING,) if tied else (_EMBEDDING, _HEAD):
        if f"{name}.weight" in state:
            state.update(_int8_if_exact(name, state.pop(f"{name}.weight")))
    if tied and f"{_EMBEDDING}.weight" in state:
        state[f"{_HEAD}.weight"] = state[f"{_EMBEDDING}.weight"]  # tied, in full precision
    return state


def _int8_if_exact(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """``NAME.qweight`` + ``NAME.scale`` where ``weight``'s rows are exactly int8 values times a
    scale each, as mlx writes its table and head (so mlx reloads what it computed, int8 and
    all); else ``NAME.weight`` as it is (another tool's full-precision layer)."""
    if weight.dtype == torch.float32 and weight.dim() == 2:
        # mlx's scales are max|w| / 127: quantize_int8 at ratio 1.0 finds them again, bit for bit
        q, scale = ql.quantize_int8(weight, clip_ratios=(1.0,))
        if torch.equal(ql.dequantize_int8(q, scale), weight):
            return {f"{name}.qweight": q, f"{name}.scale": scale}
    return {f"{name}.weight": weight}
