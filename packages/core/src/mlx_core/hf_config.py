"""HF ``config.json`` <-> ``ModelConfig``'s fields, one small function per direction
(``ModelConfig.from_hf_config`` / ``to_hf_config`` call them; this module does not import
``mlx_core.config``, so the dependency runs one way).

Reads both the transformers 4.x form (``rope_theta`` + ``rope_scaling``) and the 5.x form
(``rope_parameters``); writes the 4.x form, which both versions read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlx_core import rope_scaling

if TYPE_CHECKING:
    from mlx_core.config import ModelConfig

HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "phi3", "gemma2", "gemma3_text",
                  "gpt2", "mixtral", "qwen3_moe", "deepseek_v2", "deepseek_v3")

_HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
_SUPPORTED_ACTS = {"silu", "swish"}


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = params or legacy
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default")) if scaling else "default"
    if rope_type == "default":
        return float(theta), None
    if scaling.get("partial_rotary_factor") == 1.0:  # transformers 5 writes it: the whole head
        del scaling["partial_rotary_factor"]
    if rope_type == "longrope":  # a top-level value wins, else the model's (as transformers 5)
        scaling["original_max_position_embeddings"] = hf.get(
            "original_max_position_embeddings",
            scaling.get("original_max_position_embeddings") or hf.get("max_position_embeddings"))
    return float(theta), {"rope_type": rope_type, **scaling}


def _phi3_rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Phi-3's RoPE as HF's ``Phi3Config`` reads it: ``su`` and ``yarn`` are LongRoPE's older
    names, and its top-level ``original_max_position_embeddings`` is 4096 when absent."""
    scaling = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) in ("su", "yarn"):
        scaling = {**scaling, "rope_type": "longrope"}
        scaling.pop("type", None)
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    return _rope_from_hf({**hf, key: scaling or None, "original_max_position_embeddings":
                          hf.get("original_max_position_embeddings", 4096)})


def fields_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """``ModelConfig``'s keyword arguments for an HF ``config.json``."""
    model_type = hf.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        from mlx_core.registry import close_matches

        near = close_matches(str(model_type), list(HF_MODEL_TYPES))
        raise ValueError(
            f"config.json has model_type {model_type!r}, which mlx does not support yet; "
            f"supported: {', '.join(HF_MODEL_TYPES)}"
            + (f" (closest: {', '.join(near)})" if near else "")
        )
    tokens = {k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if model_type == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"GPT-2 activation_function {act!r} is not supported (gelu_new only)")
        return dict(
            model_type="gpt2",
            vocab_size=hf["vocab_size"],
            hidden_size=hf["n_embd"],
            num_layers=hf["n_layer"],
            num_heads=hf["n_head"],
            intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"],
            mlp_kind="gelu",
            norm_kind="layer",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            position_kind="learned",
            max_position_embeddings=hf["n_positions"],
            attention_bias=True,
            attention_out_bias=True,
            mlp_bias=True,
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            **tokens,
        )
    if model_type in ("gemma2", "gemma3_text"):
        return _gemma_from_hf(hf, model_type)
    if model_type in ("deepseek_v2", "deepseek_v3"):
        from mlx_core.hf_deepseek import deepseek_from_hf

        return deepseek_from_hf(hf, _rope_from_hf(hf))
    act = hf.get("hidden_act", "silu")
    if act not in _SUPPORTED_ACTS:
        raise ValueError(f"hidden_act {act!r} is not supported for {model_type} (silu only)")
    partial = hf.get("partial_rotary_factor",
                     (hf.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))
    if model_type == "phi3" and partial != 1.0:
        raise ValueError(f"Phi-3 partial_rotary_factor {partial} is not "
                         "supported yet (RoPE over the whole head only)")
    theta, scaling = (_phi3_rope_from_hf if model_type == "phi3" else _rope_from_hf)(hf)
    sliding = hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3", "qwen3_moe") and not hf.get("use_sliding_window", False):
        sliding = None
    if model_type in ("llama", "olmo2"):
        sliding = None
    return dict(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads"),
        head_dim=hf.get("head_dim"),
        intermediate_size=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        attention_bias=True if model_type == "qwen2" else hf.get("attention_bias", False),
        attention_out_bias=(model_type in ("llama", "qwen3", "olmo2", "qwen3_moe")
                            and hf.get("attention_bias", False)),
        qk_norm={"qwen3": "head", "qwen3_moe": "head", "olmo2": "projection"}.get(model_type),
        norm_placement="post" if model_type == "olmo2" else "pre",
        mlp_bias=hf.get("mlp_bias", False),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        sliding_window=sliding,
        **(_qwen3_moe_from_hf(hf) if model_type == "qwen3_moe" else {
            "num_experts": hf.get("num_local_experts", 0) if model_type == "mixtral" else 0,
            "num_experts_per_tok": hf.get("num_experts_per_tok", 2)}),
        **tokens,
    )


def _qwen3_moe_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """Qwen3-MoE's experts (HF's defaults where a field is absent): every
    ``decoder_sparse_step``-th layer is sparse unless listed in ``mlp_only_layers``; the others
    have a dense MLP of ``intermediate_size``. No shared expert."""
    experts = hf.get("num_experts", hf.get("num_local_experts", 128))  # transformers 5 writes the latter
    step, dense = hf.get("decoder_sparse_step", 1), hf.get("mlp_only_layers") or []
    layers = hf["num_hidden_layers"]
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"Qwen3-MoE decoder_sparse_step must be a positive integer, got {step!r}")
    if not all(isinstance(i, int) and 0 <= i < layers for i in dense):
        raise ValueError(f"Qwen3-MoE mlp_only_layers must list layers 0..{layers - 1}, got {dense!r}")
    if hf.get("shared_expert_intermediate_size"):  # Qwen2-MoE's; transformers' Qwen3-MoE has none
        raise ValueError(f"Qwen3-MoE shared_expert_intermediate_size="
                         f"{hf['shared_expert_intermediate_size']} is not supported: Qwen3-MoE "
                         "layers have no shared expert")
    return dict(
        num_experts=experts, num_experts_per_tok=hf.get("num_experts_per_tok", 8),
        moe_intermediate_size=hf.get("moe_intermediate_size", 768),
        norm_topk_prob=hf.get("norm_topk_prob", False),
        mlp_only_layers=tuple(i for i in range(layers)
                              if i in dense or experts == 0 or (i + 1) % step),
    )


def _gemma_from_hf(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
    """Gemma 2 and Gemma 3's text model: gated GELU-tanh, (1 + weight) RMSNorms before and after
    each block, embeddings times sqrt(hidden_size), alternating sliding and full layers. Gemma
    2: soft-capped attention scores and logits, one RoPE. Gemma 3: per-head q/k norms instead of
    the caps, and sliding layers with their own RoPE base (scaling applies to the full-attention
    layers only)."""
    gemma2 = model_type == "gemma2"
    name = "Gemma 2" if gemma2 else "Gemma 3"
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"{name} hidden_activation {act!r} is not supported "
                         "(gelu_pytorch_tanh only)")
    if hf.get("use_bidirectional_attention"):
        raise ValueError(f"{name} use_bidirectional_attention=true (an encoder) is not "
                         "supported: mlx runs causal decoders")
    layers = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types")
    if layer_types is None:  # the older form: every N-th layer full, the others sliding
        pattern = 2 if gemma2 else hf.get("sliding_window_pattern", 6)
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                       for i in range(layers)]
    nested = hf.get("rope_parameters") or {}
    local_theta = None
    if gemma2:
        theta, scaling = _rope_from_hf(hf)
    elif "full_attention" in nested:  # transformers 5: one RoPE block per layer type
        full, local = dict(nested["full_attention"]), dict(nested.get("sliding_attention") or {})
        theta = float(full.pop("rope_theta", 1_000_000.0))
        rope_type = full.pop("rope_type", "default")
        scaling = None if rope_type == "default" else {"rope_type": rope_type, **full}
        local_theta = float(local.get("rope_theta", 10_000.0))
    else:
        theta, scaling = _rope_from_hf({"rope_theta": 1_000_000.0, **hf})
        local_theta = float(hf.get("rope_local_base_freq", 10_000.0))
    hidden = hf["hidden_size"]
    defaults = (50.0, 30.0) if gemma2 else (None, None)  # HF's, per family
    caps = {field: hf.get(field, default) for field, default in
            zip(("attn_logit_softcapping", "final_logit_softcapping"), defaults, strict=True)}
    return dict(
        model_type=model_type, vocab_size=hf["vocab_size"], hidden_size=hidden,
        num_layers=layers, num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim", 256),
        intermediate_size=hf["intermediate_size"], mlp_kind="geglu",
        norm_eps=hf.get("rms_norm_eps", 1e-6), norm_placement="sandwich",
        qk_norm=None if gemma2 else "head", **caps,
        norm_weight_offset=1.0, embedding_multiplier=hidden**0.5,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
        rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta,
        max_position_embeddings=hf.get("max_position_embeddings", 8192 if gemma2 else 131_072),
        attention_bias=hf.get("attention_bias", False),
        attention_out_bias=hf.get("attention_bias", False),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        sliding_window=hf.get("sliding_window", 4096), layer_types=tuple(layer_types),
        bos_token_id=hf.get("bos_token_id", 2), eos_token_id=hf.get("eos_token_id", 1),
        pad_token_id=hf.get("pad_token_id", 0),  # Gemma's own defaults
    )


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The HF ``config.json`` of ``config`` (the 4.x form)."""
    c = config
    common = {
        "architectures": [_HF_ARCHITECTURES[c.model_type]],
        "model_type": c.model_type,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        **c.extra,
    }
    if c.model_type == "gpt2":
        return {
            **common,
            "n_embd": c.hidden_size,
            "n_layer": c.num_layers,
            "n_head": c.num_heads,
            "n_inner": c.intermediate_size,
            "n_positions": c.max_position_embeddings,
            "layer_norm_epsilon": c.norm_eps,
            "activation_function": "gelu_new",
        }
    hf = {
        **common,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.dim_per_head,
        "intermediate_size": c.intermediate_size,
        "hidden_act": "silu",
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": dict(c.rope_scaling) if c.rope_scaling else None,
        "max_position_embeddings": c.max_position_embeddings,
    }
    if c.model_type == "llama":
        hf.update(attention_bias=c.attention_bias, mlp_bias=c.mlp_bias)
    if c.model_type in ("mistral", "mixtral", "phi3"):
        hf["sliding_window"] = c.sliding_window
    if c.model_type == "phi3" and rope_scaling.rope_type(c.rope_scaling) == "longrope":
        # Phi3Config reads it at the top level (4096 when absent) before the scaling's own
        hf["original_max_position_embeddings"] = c.rope_scaling["original_max_position_embeddings"]
    if c.model_type in ("qwen2", "qwen3", "qwen3_moe"):
        hf.update(use_sliding_window=c.sliding_window is not None, sliding_window=c.sliding_window)
    if c.model_type in ("qwen3", "olmo2", "qwen3_moe"):
        hf["attention_bias"] = c.attention_bias
    if c.model_type == "mixtral":
        if c.moe_intermediate_size not in (None, c.intermediate_size) or not c.norm_topk_prob \
                or c.mlp_only_layers:
            raise ValueError("a Mixtral config.json holds experts of intermediate_size on every "
                             "layer with renormalised weights: moe_intermediate_size, "
                             "norm_topk_prob=False and mlp_only_layers need model_type qwen3_moe")
        hf.update(num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok)
    if c.model_type == "qwen3_moe":
        hf.update(num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                  moe_intermediate_size=c.expert_intermediate_size,
                  norm_topk_prob=c.norm_topk_prob, decoder_sparse_step=1,
                  mlp_only_layers=list(c.mlp_only_layers))
    if c.model_type in ("gemma2", "gemma3_text"):
        del hf["hidden_act"]
        hf.update(hidden_activation="gelu_pytorch_tanh", attention_bias=c.attention_bias,
                  query_pre_attn_scalar=_int_if_whole(c.query_pre_attn_scalar or c.dim_per_head),
                  sliding_window=c.sliding_window,
                  layer_types=list(c.layer_types) if c.layer_types else
                  ["sliding_attention" if c.sliding_window else "full_attention"] * c.num_layers,
                  final_logit_softcapping=c.final_logit_softcapping,
                  attn_logit_softcapping=c.attn_logit_softcapping)
    if c.model_type in ("deepseek_v2", "deepseek_v3"):
        from mlx_core.hf_deepseek import deepseek_to_hf

        hf.update(deepseek_to_hf(c))
    if c.model_type == "gemma3_text":
        hf["rope_local_base_freq"] = c.rope_local_theta or c.rope_theta
    return hf


def _int_if_whole(value: float) -> int | float:
    """HF's Gemma config types query_pre_attn_scalar as an int."""
    return int(value) if float(value).is_integer() else value
