"""Named ``ModelConfig``s: tiny configs for tests and the real sizes of the families we cover."""

from __future__ import annotations

from mlx_core import registry
from mlx_core.config import ModelConfig

_TINY = dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
             intermediate_size=96, max_position_embeddings=256)

# HF config.json fields of the tiny DeepSeek presets
_TINY_DEEPSEEK = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=96, max_position_embeddings=256, kv_lora_rank=16,
                      qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                      moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                      first_k_dense_replace=1)

PRESETS: dict[str, ModelConfig] = {
    # Tiny random models for tests: every family, every code path, milliseconds per forward.
    "tiny-llama": ModelConfig(model_type="llama", **_TINY),
    "tiny-llama3": ModelConfig(
        model_type="llama", rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        **_TINY),
    "tiny-mistral": ModelConfig(model_type="mistral", sliding_window=8, **_TINY),
    "tiny-qwen2": ModelConfig(model_type="qwen2", attention_bias=True, tie_word_embeddings=True,
                              norm_eps=1e-6, **_TINY),
    "tiny-qwen3": ModelConfig(model_type="qwen3", qk_norm="head", tie_word_embeddings=True,
                              norm_eps=1e-6, head_dim=32, **_TINY),
    "tiny-olmo2": ModelConfig(model_type="olmo2", qk_norm="projection", norm_placement="post",
                              pad_token_id=88, **_TINY),  # a pad row (no gradient) the test batches use
    "tiny-phi3": ModelConfig(model_type="phi3", **_TINY),
    # RoPE tables that depend on the length, switching at 16 tokens: dynamic NTK's base grows
    # past max_position_embeddings; Phi-3's LongRoPE takes its long factors past the original
    "tiny-llama-dynamic-rope": ModelConfig(
        model_type="llama", rope_scaling={"rope_type": "dynamic", "factor": 4.0},
        **{**_TINY, "max_position_embeddings": 16}),
    "tiny-phi3-longrope": ModelConfig(
        model_type="phi3", rope_scaling={
            "rope_type": "longrope", "original_max_position_embeddings": 16,
            "short_factor": [1.0 + 0.3 * i for i in range(8)],
            "long_factor": [1.0 + 2.0 * i for i in range(8)]}, **_TINY),
    # Gemma 3: a window shorter than test prompts on the first layer, full attention on the second
    "tiny-gemma2": ModelConfig(  # caps small enough to bite on random weights
        model_type="gemma2", mlp_kind="geglu", norm_placement="sandwich", norm_weight_offset=1.0,
        embedding_multiplier=64**0.5, query_pre_attn_scalar=24.0, head_dim=16, norm_eps=1e-6,
        tie_word_embeddings=True, sliding_window=6,
        layer_types=("sliding_attention", "full_attention"), attn_logit_softcapping=1.5,
        final_logit_softcapping=3.0, pad_token_id=0, bos_token_id=2, eos_token_id=1, **_TINY),
    "tiny-gemma3": ModelConfig(
        model_type="gemma3_text", mlp_kind="geglu", norm_placement="sandwich", qk_norm="head",
        norm_weight_offset=1.0, embedding_multiplier=64**0.5, query_pre_attn_scalar=24.0,
        head_dim=16, norm_eps=1e-6, tie_word_embeddings=True, sliding_window=6,
        layer_types=("sliding_attention", "full_attention"), rope_theta=1e6,
        rope_local_theta=1e4, pad_token_id=0, bos_token_id=2, eos_token_id=1, **_TINY),
    "tiny-mixtral": ModelConfig(model_type="mixtral", num_experts=4, num_experts_per_tok=2, **_TINY),
    # one sparse layer (4 experts of 32), then a dense one (mlp_only_layers)
    "tiny-qwen3-moe": ModelConfig(
        model_type="qwen3_moe", qk_norm="head", norm_eps=1e-6, head_dim=32, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=(1,), **_TINY),
    # DeepSeek-V2: multi-head latent attention (plain queries), a dense first layer, then 4
    # routed experts of 32 (softmax, greedy) plus 2 shared; DeepSeek-V3: queries through a
    # rank-24 bottleneck, sigmoid routing with a bias, 2 groups of which each token sees 1
    "tiny-deepseek-v2": ModelConfig.from_hf_config({
        "model_type": "deepseek_v2", **_TINY_DEEPSEEK, "q_lora_rank": None,
        "n_shared_experts": 2, "topk_method": "greedy"}),
    "tiny-deepseek-v3": ModelConfig.from_hf_config({
        "model_type": "deepseek_v3", **_TINY_DEEPSEEK, "q_lora_rank": 24, "n_shared_experts": 1,
        "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5}),
    "tiny-gpt2": ModelConfig(
        model_type="gpt2", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4,
        intermediate_size=256, mlp_kind="gelu", norm_kind="layer", position_kind="learned",
        max_position_embeddings=256, attention_bias=True, attention_out_bias=True, mlp_bias=True,
        tie_word_embeddings=True, bos_token_id=127, eos_token_id=127),
    # Real sizes.
    "smollm2-135m": ModelConfig(
        model_type="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
        num_kv_heads=3, intermediate_size=1536, norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        pad_token_id=2),
    "gpt2": ModelConfig(
        model_type="gpt2", vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12,
        intermediate_size=3072, mlp_kind="gelu", norm_kind="layer", position_kind="learned",
        max_position_embeddings=1024, attention_bias=True, attention_out_bias=True, mlp_bias=True,
        tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256),
    "llama3-8b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,
        num_kv_heads=8, intermediate_size=14336, rope_theta=500000.0,
        max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001),
    "mistral-7b": ModelConfig(
        model_type="mistral", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
        num_kv_heads=8, intermediate_size=14336, max_position_embeddings=32768,
        sliding_window=4096),
    "qwen2-0.5b": ModelConfig(
        model_type="qwen2", vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14,
        num_kv_heads=2, intermediate_size=4864, norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=32768, attention_bias=True, tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151643),
    "qwen3-0.6b": ModelConfig(
        model_type="qwen3", vocab_size=151936, hidden_size=1024, num_layers=28, num_heads=16,
        num_kv_heads=8, head_dim=128, intermediate_size=3072, norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=40960, qk_norm="head",
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645),
    # google/gemma-2-2b's config.json (HF's Gemma2Config defaults), through the HF reader
    "gemma-2-2b": ModelConfig.from_hf_config({
        "model_type": "gemma2", "vocab_size": 256000, "hidden_size": 2304,
        "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
        "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 8192,
        "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}),
    # google/gemma-3-1b-it's config.json, through the HF reader (one sliding layer form)
    "gemma-3-1b": ModelConfig.from_hf_config({
        "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 1152,
        "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 256, "max_position_embeddings": 32768,
        "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0, "sliding_window": 512, "sliding_window_pattern": 6,
        "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}),
    "mixtral-8x7b": ModelConfig(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
        num_kv_heads=8, intermediate_size=14336, rope_theta=1000000.0,
        max_position_embeddings=32768, num_experts=8, num_experts_per_tok=2),
    # Qwen/Qwen3-30B-A3B's config.json, through the HF reader: 30,532,122,624 parameters
    # (3.3B active per token: 8 of 128 experts)
    "qwen3-30b-a3b": ModelConfig.from_hf_config({
        "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 40960,
        "max_window_layers": 48, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "rope_scaling": None, "use_sliding_window": False, "sliding_window": None,
        "attention_bias": False, "tie_word_embeddings": False, "hidden_act": "silu",
        "bos_token_id": 151643, "eos_token_id": 151645}),
    # deepseek-ai/DeepSeek-V2-Lite's config.json, through the HF reader: 15.7B parameters
    # (15,706,484,224); 2.66B run per token (6 of 64 routed experts, 2 shared), 2.45B without
    # the embedding table: the published "2.4B activated"
    "deepseek-v2-lite": ModelConfig.from_hf_config({
        "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048,
        "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
        "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 64,
        "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
        "moe_layer_freq": 1, "n_group": 1, "topk_group": 1, "topk_method": "greedy",
        "scoring_func": "softmax", "norm_topk_prob": False, "routed_scaling_factor": 1.0,
        "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-6, "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 0.707, "mscale_all_dim": 0.707,
                         "original_max_position_embeddings": 4096},
        "attention_bias": False, "tie_word_embeddings": False, "hidden_act": "silu",
        "bos_token_id": 100000, "eos_token_id": 100001}),
}

for _name, _config in PRESETS.items():
    registry.presets.register(_name, _config)


def get_preset(name: str) -> ModelConfig:
    return registry.presets.get(name)
