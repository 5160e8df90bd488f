"""GGUF file -> HF-format directory (``config.json``, ``model.safetensors``, tokenizer files).

Torch-free: tensors are read and de-quantized to fp32 with the ``gguf`` package's own numpy
code, written with ``safetensors.numpy``; the tokenizer is rebuilt with ``tokenizers`` from the
vocabulary, merges and special-token ids that the GGUF metadata carries.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mlx_core import gguf_deepseek
from mlx_core.config import ModelConfig

# llama.cpp's "llama" covers Llama 2/3, Mistral and SmolLM2; its model_type here for each
# ("deepseek2": DeepSeek-V2, or V3 where its experts are gated by sigmoid; gguf_deepseek)
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "olmo2": "olmo2",
                "phi3": "phi3", "gemma2": "gemma2", "gemma3": "gemma3_text",
                "deepseek2": "deepseek_v2"}
SUPPORTED_ARCHS = tuple(_MODEL_TYPES)

# GGUF name (``{}`` = layer) -> HF Llama name: every architecture's, then each one's own.
_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}
_GEMMA_NORMS = {
    "blk.{}.post_attention_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.pre_feedforward_layernorm.weight",
    "blk.{}.post_ffw_norm.weight": "model.layers.{}.post_feedforward_layernorm.weight",
}
_ARCH_NAMES = {
    "qwen2": {f"blk.{{}}.attn_{p}.bias": f"model.layers.{{}}.self_attn.{p}_proj.bias"
              for p in "qkv"},
    "qwen3": {f"blk.{{}}.attn_{p}_norm.weight": f"model.layers.{{}}.self_attn.{p}_norm.weight"
              for p in "qk"},
    # OLMo 2: norms after attention and MLP (no input norms), q/k norms over whole projections
    "olmo2": {"blk.{}.post_attention_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
              "blk.{}.post_ffw_norm.weight": "model.layers.{}.post_feedforward_layernorm.weight",
              **{f"blk.{{}}.attn_{p}_norm.weight": f"model.layers.{{}}.self_attn.{p}_norm.weight"
                 for p in "qk"}},
    # Phi-3: q/k/v in one tensor, gate/up in another (split_fused), as its HF checkpoints
    "phi3": {"blk.{}.attn_qkv.weight": "model.layers.{}.self_attn.qkv_proj.weight",
             "blk.{}.ffn_up.weight": "model.layers.{}.mlp.gate_up_proj.weight"},
    # Gemma 2: a norm before and after attention and MLP (llama.cpp's ffn_norm is the one before)
    "gemma2": _GEMMA_NORMS,
    # Gemma 3: those, and per-head q/k norms
    "gemma3": {**_GEMMA_NORMS, **{f"blk.{{}}.attn_{p}_norm.weight":
                                  f"model.layers.{{}}.self_attn.{p}_norm.weight" for p in "qk"}},
    # DeepSeek-V2/V3: multi-head latent attention, routed (stacked) and shared experts
    "deepseek2": gguf_deepseek.NAMES,
}
# tensors an architecture does not have (OLMo 2 normalises after each block, not before)
_ARCH_ABSENT = {"olmo2": ("blk.{}.attn_norm.weight", "blk.{}.ffn_norm.weight"),
                "phi3": ("blk.{}.attn_q.weight", "blk.{}.attn_k.weight", "blk.{}.attn_v.weight",
                         "blk.{}.ffn_gate.weight"),
                "deepseek2": gguf_deepseek.ABSENT}
_IGNORED = ("rope_freqs.weight",)  # llama.cpp's precomputed RoPE factors; we derive them
# Phi-3's LongRoPE factors, which llama.cpp writes as tensors: HF's rope_scaling lists
_LONGROPE_FACTORS = {"rope_factors_long.weight": "long_factor",
                     "rope_factors_short.weight": "short_factor"}
_LONGROPE_ARCHS = ("phi3",)
# llama.cpp permutes Q/K rows for its "llama" RoPE layout only; qwen2/qwen3 keep HF's (NeoX) one
_PERMUTED_ARCHS = ("llama",)
# Gemma's RMSNorms scale by (1 + weight); llama.cpp stores 1 + weight, HF the weight: -1 on load
_NORM_OFFSET_ARCHS = ("gemma2", "gemma3")


def _check_arch(arch, where: str) -> None:
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"{where}GGUF architecture {arch!r} is not supported yet; supported: "
                         f"{', '.join(SUPPORTED_ARCHS)}")


def _open(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError on bad files
        raise ValueError(f"cannot read {path} as GGUF: {type(e).__name__}: {e}. "
                         "Is it a complete .gguf file?") from None


def _progress(items, description: str):
    """A progress bar on stderr (plain when stderr is not a terminal)."""
    from rich.console import Console
    from rich.progress import track

    return track(items, description=description, console=Console(stderr=True), transient=True)


def _metadata(reader) -> dict[str, Any]:
    out = {}
    for name, field in reader.fields.items():
        try:
            out[name] = field.contents()
        except Exception:  # a value type this gguf version cannot decode: not one we use
            continue
    return out


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (its RoPE pairs adjacent dims; HF pairs halves)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_config(meta: dict[str, Any], vocab_size: int, tied: bool) -> dict[str, Any]:
    arch = meta.get("general.architecture")
    _check_arch(arch, "")

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    hf = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": get("context_length", 4096),
        "tie_word_embeddings": tied,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    if arch == "deepseek2":  # its key/value lengths and rope scaling are its own (gguf_deepseek)
        hf.update(gguf_deepseek.hf_fields(get))
        return ModelConfig.from_hf_config(hf).to_hf_config()
    hf.update(model_type=_MODEL_TYPES[arch],
              num_key_value_heads=get("attention.head_count_kv", heads),
              head_dim=get("attention.key_length", hidden // heads))
    if arch in ("gemma2", "gemma3"):
        hf.update(_gemma_fields(meta, arch))
    scaling_type = get("rope.scaling.type")
    if "long_factor" in meta:  # Phi-3's LongRoPE (named_tensors put its factors in meta)
        hf["rope_scaling"] = _longrope_scaling(meta, get)
        # Phi-3's config also says it at the top level, where HF reads it first
        hf["original_max_position_embeddings"] = hf["rope_scaling"]["original_max_position_embeddings"]
    elif scaling_type == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling_type not in (None, "none"):
        raise ValueError(f"GGUF rope scaling {scaling_type!r} is not supported yet")
    # Validate and normalise through our config, so the file says what our config writes.
    return ModelConfig.from_hf_config(hf).to_hf_config()


def _longrope_scaling(meta: dict[str, Any], get) -> dict[str, Any]:
    """HF's LongRoPE ``rope_scaling`` from llama.cpp's factor tensors and its keys: the context
    the model was trained at, and the attention factor where the file has one (else HF derives
    the same value from the two lengths)."""
    if "short_factor" not in meta:
        raise ValueError("GGUF LongRoPE needs both rope_factors_long and rope_factors_short")
    original = get("rope.scaling.original_context_length")
    if original is None:
        raise ValueError("GGUF LongRoPE needs rope.scaling.original_context_length")
    scaling = {"rope_type": "longrope", "long_factor": meta["long_factor"],
               "short_factor": meta["short_factor"], "original_max_position_embeddings": original}
    if get("rope.scaling.attn_factor") is not None:
        scaling["attention_factor"] = float(get("rope.scaling.attn_factor"))
    return scaling


# llama.cpp scales Gemma's queries by model size: its 27B models by hidden_size / heads (what
# their HF configs' query_pre_attn_scalar says, 144 and 168), every other size by head_dim
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _gemma_fields(meta: dict[str, Any], arch: str) -> dict[str, Any]:
    """What a Gemma 2/3 config.json holds beyond Llama's, from llama.cpp's keys (and the values
    llama.cpp fixes for these families where the file has no key)."""
    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    hidden, heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", hidden // heads)
    scale = get("attention.scale")
    fields = {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": (1.0 / float(scale) ** 2 if scale
                                  else hidden // heads if get("block_count") == _GEMMA_27B_LAYERS[arch]
                                  else head_dim),
        "sliding_window": get("attention.sliding_window", 4096),
    }
    if arch == "gemma2":
        fields["attn_logit_softcapping"] = get("attn_logit_softcapping", 50.0)
        fields["final_logit_softcapping"] = get("final_logit_softcapping", 30.0)
        return fields
    # Gemma 3: five sliding layers to one full one, and a RoPE base of 10,000 on the sliding
    # ones, unless the file says otherwise (a pattern: its period, or a flag per layer)
    pattern = get("attention.sliding_window_pattern", 6)
    if isinstance(pattern, (list, tuple)):
        fields["layer_types"] = ["sliding_attention" if s else "full_attention" for s in pattern]
    else:
        fields["sliding_window_pattern"] = int(pattern)
    fields["rope_local_base_freq"] = float(get("rope.freq_base_swa", 10_000.0))
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if get(key) is not None:
            fields[key] = float(get(key))
    return fields


class GGUFModel(NamedTuple):
    hf_config: dict[str, Any]  # what config.json holds
    tensors: dict[str, np.ndarray]  # fp32, under HF Llama names
    metadata: dict[str, Any]  # the GGUF key/value metadata (tokenizer included)


class NamedTensor(NamedTuple):
    """One GGUF tensor under its HF name, with what turns llama.cpp's values into HF's."""
    name: str
    tensor: Any  # the gguf reader's tensor
    heads: int | None  # undo llama.cpp's Q/K row permutation over this many heads (None: none)
    offset: float  # added to the values read (Gemma's norms: -1; else 0)


def named_tensors(path: str | Path, description: str):
    """``(metadata, [NamedTensor])`` of a GGUF file. Raises on an unsupported architecture or
    an unexpected tensor."""
    path = Path(path)
    reader = _open(path)
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    _check_arch(arch, f"{path.name}: ")
    names = {**_NAMES, **_ARCH_NAMES.get(arch, {})}
    for absent in _ARCH_ABSENT.get(arch, ()):
        del names[absent]
    heads = meta[f"{arch}.attention.head_count"]
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    named = []
    for t in reader.tensors:
        if t.name in _IGNORED:
            continue
        if t.name in _LONGROPE_FACTORS:  # config, not weights: hf_config reads them from meta
            if arch not in _LONGROPE_ARCHS:
                raise ValueError(f"{path.name}: {t.name} (LongRoPE factors) in a {arch!r} file; "
                                 f"mlx reads them in {', '.join(_LONGROPE_ARCHS)} files only")
            meta[_LONGROPE_FACTORS[t.name]] = [float(v) for v in np.asarray(t.data, np.float32)]
            continue
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
        template, layer = (f"blk.{{}}.{m.group(2)}", m.group(1)) if m else (t.name, None)
        if template not in names:
            raise ValueError(f"{path.name}: unexpected GGUF tensor {t.name!r} for architecture {arch!r}")
        permuted = None
        if arch in _PERMUTED_ARCHS:
            permuted = (heads if template.endswith("attn_q.weight")
                        else kv_heads if template.endswith("attn_k.weight") else None)
        offset = -1.0 if arch in _NORM_OFFSET_ARCHS and template.endswith("norm.weight") else 0.0
        named.append(NamedTensor(names[template].format(layer), t, permuted, offset))
    return meta, _progress(named, description)


def split_fused(config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    """Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` tensors (fp32 ``.weight``, or a quantized
    layout's per-row ``.qweight`` / ``.scale(s)`` / ``.mins``) split by rows, in place, into the
    zoo's separate projections; DeepSeek's stacked experts split and ``kv_b_proj`` rebuilt
    (``gguf_deepseek.assemble``)."""
    if config["model_type"] in gguf_deepseek.MODEL_TYPES:
        gguf_deepseek.assemble(config, tensors)
        return
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    parts = {"self_attn.qkv_proj": (("self_attn.q_proj", q), ("self_attn.k_proj", kv),
                                    ("self_attn.v_proj", kv)),
             "mlp.gate_up_proj": (("mlp.gate_proj", config["intermediate_size"]),
                                  ("mlp.up_proj", config["intermediate_size"]))}
    for name in [n for n in tensors if any(f".{fused}." in n for fused in parts)]:
        fused = next(f for f in parts if f".{f}." in name)
        whole = tensors.pop(name)
        start = 0
        for part, rows in parts[fused]:
            tensors[name.replace(fused, part)] = np.ascontiguousarray(whole[start:start + rows])
            start += rows


def unpermute_rows(w: np.ndarray, heads: int | None) -> np.ndarray:
    return w if heads is None else _unpermute(w, heads)


def as_hf_values(w: np.ndarray, entry: NamedTensor) -> np.ndarray:
    """A float tensor's values as HF has them: rows un-permuted, offset added."""
    w = unpermute_rows(w, entry.heads)
    return w + np.float32(entry.offset) if entry.offset else w


def dequantized(tensor) -> np.ndarray:
    """A gguf reader's tensor as fp32 values, in numpy's order (``[..., rows, cols]``)."""
    import gguf

    return np.ascontiguousarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type),
                                dtype=np.float32)


def read_gguf(path: str | Path) -> GGUFModel:
    """Read, de-quantize and rename every tensor of a GGUF file."""
    path = Path(path)
    meta, named = named_tensors(path, f"de-quantizing {path.name}")
    tensors: dict[str, np.ndarray] = {}
    for entry in named:
        tensors[entry.name] = as_hf_values(dequantized(entry.tensor), entry)
    vocab_size = tensors["model.embed_tokens.weight"].shape[0]
    config = hf_config(meta, vocab_size, tied="lm_head.weight" not in tensors)
    split_fused(config, tensors)
    return GGUFModel(config, tensors, meta)


def convert_gguf_to_hf_dir(gguf_path: str | Path, out_dir: str | Path) -> None:
    """Write an HF-format directory into ``out_dir`` (an existing, empty directory)."""
    from safetensors.numpy import save_file

    from mlx_core.gguf_tokenizer import write_tokenizer_files

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    config, tensors, meta = read_gguf(gguf_path)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    write_tokenizer_files(meta, out_dir)
