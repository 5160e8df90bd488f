"""DeepSeek-V2 / V3 ``config.json`` <-> ``ModelConfig``'s fields (``hf_config`` calls these for
model_type ``deepseek_v2`` / ``deepseek_v3``; HF transformers' defaults where a field is absent).

Both are multi-head latent attention (``attention_kind="mla"``) over DeepSeekMoE: the first
``first_k_dense_replace`` layers (and those off ``moe_layer_freq``) dense MLPs of
``intermediate_size``, the others ``n_routed_experts`` routed experts plus ``n_shared_experts``.
V2 routes by softmax (``greedy`` or ``group_limited_greedy``); V3 by sigmoid with a bias in the
choice (``noaux_tc``) and renormalised weights. V2 always interleaves its RoPE pairs; V3 where
``rope_interleave`` (its default).

Where the original DeepSeek code and HF transformers disagree, configs that would tell them apart
are refused rather than guessed: V2 with ``norm_topk_prob=true`` (HF ignores it; the original
renormalises and then skips ``routed_scaling_factor``), V3 with another ``topk_method`` or
``scoring_func`` than ``noaux_tc`` / ``sigmoid`` (HF runs those whatever the config says; the
original refuses others). ``moe_layer_freq`` follows the original (HF ignores it; every released
checkpoint has 1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlx_core.config import ModelConfig

# HF transformers' DeepseekV2Config / DeepseekV3Config defaults for the fields read here
_DEFAULTS = {
    "deepseek_v2": dict(
        vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=2, first_k_dense_replace=0, kv_lora_rank=512,
        q_lora_rank=1536, n_group=None, n_routed_experts=64, n_shared_experts=2,
        qk_nope_head_dim=128, qk_rope_head_dim=64, routed_scaling_factor=1.0, topk_group=None,
        topk_method="greedy", norm_topk_prob=False, v_head_dim=128, num_experts_per_tok=None,
        moe_intermediate_size=1407, scoring_func="softmax"),
    "deepseek_v3": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_hidden_layers=61,
        num_attention_heads=128, max_position_embeddings=4096, rms_norm_eps=1e-6,
        bos_token_id=0, eos_token_id=1, first_k_dense_replace=3, kv_lora_rank=512,
        q_lora_rank=1536, n_group=8, n_routed_experts=256, n_shared_experts=1,
        qk_nope_head_dim=128, qk_rope_head_dim=64, routed_scaling_factor=2.5, topk_group=4,
        topk_method="noaux_tc", norm_topk_prob=True, v_head_dim=128, num_experts_per_tok=8,
        moe_intermediate_size=2048, scoring_func="sigmoid"),
}
_V2_METHODS = ("greedy", "group_limited_greedy")


def deepseek_from_hf(hf: dict[str, Any], rope: tuple[float, dict[str, Any] | None]) -> dict[str, Any]:
    """``ModelConfig``'s keyword arguments for a DeepSeek-V2/V3 ``config.json`` (``rope``: its
    ``(rope_theta, rope_scaling)`` as ``hf_config`` reads them)."""
    model_type = hf["model_type"]
    name = "DeepSeek-V2" if model_type == "deepseek_v2" else "DeepSeek-V3"
    get = {**_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None or k in
                                      ("q_lora_rank", "n_routed_experts")}}.get
    act = get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{name} hidden_act {act!r} is not supported (silu only)")
    if get("mlp_bias", False):
        raise ValueError(f"{name} mlp_bias=true is not supported: the zoo's experts have no bias")
    scoring, method = get("scoring_func"), get("topk_method")
    if model_type == "deepseek_v2":
        if scoring != "softmax":
            raise ValueError(f"{name} scoring_func {scoring!r} is not supported: DeepSeek-V2 "
                             "routes by softmax (scoring_func 'softmax')")
        if method not in _V2_METHODS:
            raise ValueError(f"{name} topk_method {method!r} is not supported; supported: "
                             f"{', '.join(_V2_METHODS)}")
        if get("norm_topk_prob"):
            raise ValueError(f"{name} norm_topk_prob=true is not supported: HF transformers "
                             "ignores it and DeepSeek's own code renormalises instead of scaling "
                             "by routed_scaling_factor; the released V2 checkpoints have false")
    else:
        if method != "noaux_tc":
            raise ValueError(f"{name} topk_method {method!r} is not supported: DeepSeek-V3 "
                             "routes with 'noaux_tc'")
        if scoring != "sigmoid":
            raise ValueError(f"{name} scoring_func {scoring!r} is not supported: DeepSeek-V3 "
                             "scores experts by 'sigmoid'")
    layers = get("num_hidden_layers")
    experts = get("n_routed_experts") or 0
    first_dense, freq = get("first_k_dense_replace") or 0, get("moe_layer_freq", 1)
    if not isinstance(freq, int) or freq < 1:
        raise ValueError(f"{name} moe_layer_freq must be a positive integer, got {freq!r}")
    if experts and get("num_experts_per_tok") is None:
        raise ValueError(f"{name} config.json has n_routed_experts={experts} but no "
                         "num_experts_per_tok")
    theta, scaling = rope
    return dict(
        model_type=model_type, vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
        num_layers=layers, num_heads=get("num_attention_heads"),
        intermediate_size=get("intermediate_size"), norm_eps=get("rms_norm_eps"),
        rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=get("max_position_embeddings"),
        attention_bias=get("attention_bias", False), attention_out_bias=get("attention_bias", False),
        tie_word_embeddings=get("tie_word_embeddings", False),
        attention_kind="mla", q_lora_rank=get("q_lora_rank"), kv_lora_rank=get("kv_lora_rank"),
        qk_nope_head_dim=get("qk_nope_head_dim"), qk_rope_head_dim=get("qk_rope_head_dim"),
        v_head_dim=get("v_head_dim"),
        rope_interleave=True if model_type == "deepseek_v2" else bool(get("rope_interleave", True)),
        num_experts=experts, num_experts_per_tok=get("num_experts_per_tok") or 2,
        moe_intermediate_size=get("moe_intermediate_size"),
        norm_topk_prob=bool(get("norm_topk_prob")), n_shared_experts=get("n_shared_experts") or 0,
        routed_scaling_factor=float(get("routed_scaling_factor")), scoring_func=scoring,
        topk_method=method, n_group=get("n_group"), topk_group=get("topk_group"),
        mlp_only_layers=tuple(i for i in range(layers)
                              if experts == 0 or i < first_dense or i % freq),
        bos_token_id=get("bos_token_id"), eos_token_id=get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )


def deepseek_to_hf(c: ModelConfig) -> dict[str, Any]:
    """The DeepSeek-specific fields of ``c``'s ``config.json``."""
    if not c.is_mla:
        raise ValueError(f"model_type {c.model_type} needs attention_kind 'mla'")
    if c.attention_out_bias != c.attention_bias:
        raise ValueError(f"{c.model_type}'s config.json has one attention_bias for every "
                         "attention projection: attention_out_bias must equal attention_bias")
    first_dense, freq = _dense_layout(c)
    hf = dict(
        attention_bias=c.attention_bias, q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank,
        qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim,
        v_head_dim=c.v_head_dim, n_routed_experts=c.num_experts or None,
        num_experts_per_tok=c.num_experts_per_tok,
        moe_intermediate_size=c.expert_intermediate_size, n_shared_experts=c.n_shared_experts,
        routed_scaling_factor=c.routed_scaling_factor, scoring_func=c.scoring_func,
        topk_method=c.topk_method, n_group=c.n_group, topk_group=c.topk_group,
        norm_topk_prob=c.norm_topk_prob, first_k_dense_replace=first_dense, moe_layer_freq=freq,
    )
    if c.model_type == "deepseek_v3":
        hf["rope_interleave"] = c.rope_interleave
    elif not c.rope_interleave:
        raise ValueError("DeepSeek-V2 always interleaves its RoPE pairs: rope_interleave must be "
                         "true for model_type deepseek_v2")
    return hf


def _dense_layout(c: ModelConfig) -> tuple[int, int]:
    """``(first_k_dense_replace, moe_layer_freq)`` giving ``c``'s dense layers."""
    dense = set(c.mlp_only_layers)
    if c.num_experts == 0:
        return 0, 1
    for freq in range(1, c.num_layers + 1):
        for first in range(c.num_layers + 1):
            if dense == {i for i in range(c.num_layers) if i < first or i % freq}:
                return first, freq
    raise ValueError(f"mlp_only_layers={c.mlp_only_layers} is not the first k layers plus those "
                     "off a moe_layer_freq, which is all a DeepSeek config.json can say")
