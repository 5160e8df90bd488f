"""Registry, ModelConfig (JSON and HF config.json round-trips) and presets."""

import json

import pytest

from mlx_core import ModelConfig, Registry, UnknownNameError, registry
from mlx_core.plugins import load_plugins
from mlx_core.presets import PRESETS, get_preset


def test_registry_register_get_and_close_matches():
    r = Registry("widget")
    r.register("alpha", 1)

    @r.register("beta")
    def beta():
        return 2

    assert r.get("alpha") == 1 and r.get("beta") is beta and r.names() == ["alpha", "beta"]
    with pytest.raises(UnknownNameError, match="Did you mean: alpha"):
        r.get("alpah")
    with pytest.raises(ValueError, match="already registered"):
        r.register("alpha", 3)
    r.register("alpha", 3, overwrite=True)
    assert r.get("alpha") == 3


def test_deferred_entries_import_their_target_when_first_asked_for():
    r = Registry("widget")
    r.register_deferred("ordered", "collections:OrderedDict")
    r.register("plain", 1)
    assert "ordered" in r and r.names() == ["ordered", "plain"]
    import collections

    assert r.get("ordered") is collections.OrderedDict
    assert r.items() == [("ordered", collections.OrderedDict), ("plain", 1)]
    with pytest.raises(ValueError, match="already registered"):
        r.register_deferred("plain", "collections:Counter")
    with pytest.raises(ValueError, match="'module:attribute'"):
        r.register_deferred("broken", "collections.Counter")
    r.register_deferred("missing", "collections:NoSuchThing")
    with pytest.raises(AttributeError, match="NoSuchThing"):
        r.get("missing")


def test_unknown_model_lists_close_matches():
    load_plugins()
    with pytest.raises(UnknownNameError) as err:
        registry.model_sources.get("smollm2")
    assert "smollm2-135m-instruct" in str(err.value)


def test_plugins_fill_the_registries():
    load_plugins()
    assert "smollm2-135m-instruct" in registry.model_sources
    assert set(registry.architectures.names()) >= {"llama", "mistral", "qwen2", "gpt2", "mixtral"}
    assert "torch" in registry.architectures.get("llama")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_json_and_hf(name):
    config = get_preset(name)
    assert ModelConfig.from_json(config.to_json()) == config
    assert ModelConfig.from_hf_config(json.loads(json.dumps(config.to_hf_config()))) == config


def test_smollm2_preset_size():
    assert 134e6 < get_preset("smollm2-135m").num_parameters() < 136e6


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(num_heads=6, num_kv_heads=4, hidden_size=48)
    with pytest.raises(ValueError, match="mlp_kind"):
        ModelConfig(mlp_kind="relu")
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({"hidden": 3})
    with pytest.raises(ValueError, match="model_type 'bert'"):
        ModelConfig.from_hf_config({"model_type": "bert"})
    with pytest.raises(ValueError, match=r"'qwen2_moe'.*supported: .*olmo2.*\(closest: qwen3_moe"):
        ModelConfig.from_hf_config({"model_type": "qwen2_moe"})


@pytest.mark.parametrize("field,value", [("hidden_act", "gelu"), ("decoder_sparse_step", 0),
                                         ("mlp_only_layers", [2]),
                                         ("shared_expert_intermediate_size", 64),
                                         ("num_experts_per_tok", 5)])
def test_unsupported_qwen3_moe_fields_fail_at_load_naming_them(field, value, tmp_path):
    from mlx_core import load_model

    hf = {**get_preset("tiny-qwen3-moe").to_hf_config(), field: value}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=field):
        load_model(tmp_path)


def test_qwen3_moe_layers_follow_sparse_step_and_mlp_only_layers():
    """HF's rule: layer i is sparse when (i + 1) % decoder_sparse_step == 0 and it is not in
    mlp_only_layers; transformers 5 writes num_experts as num_local_experts."""
    hf = {**get_preset("tiny-qwen3-moe").to_hf_config(), "num_hidden_layers": 6,
          "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    config = ModelConfig.from_hf_config(hf)
    assert [config.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]
    hf["num_local_experts"] = hf.pop("num_experts")
    assert ModelConfig.from_hf_config(hf) == config


def test_reads_transformers5_rope_parameters():
    hf = get_preset("tiny-llama3").to_hf_config()
    scaling = hf.pop("rope_scaling")
    hf["rope_parameters"] = {**scaling, "rope_theta": hf.pop("rope_theta")}
    assert ModelConfig.from_hf_config(hf) == get_preset("tiny-llama3")


@pytest.mark.parametrize("preset,hf_class", [("tiny-llama-dynamic-rope", "LlamaConfig"),
                                             ("tiny-phi3-longrope", "Phi3Config")])
def test_length_dependent_rope_round_trips_through_transformers(preset, hf_class, tmp_path):
    """Written as config.json, read by transformers' own config class (which validates the
    RoPE fields), saved in its 5.x form (rope_parameters) and read back: the same config."""
    import transformers

    config = get_preset(preset)
    theirs = getattr(transformers, hf_class)(**config.to_hf_config())
    assert theirs.rope_parameters["rope_type"] == config.rope_scaling["rope_type"]
    if preset == "tiny-phi3-longrope":  # Phi3Config reads the top-level field first
        assert theirs.rope_parameters["original_max_position_embeddings"] == 16
    theirs.save_pretrained(tmp_path)
    assert "rope_parameters" in json.loads((tmp_path / "config.json").read_text())
    assert ModelConfig.from_pretrained(tmp_path) == config


def test_phi3_longrope_reads_the_older_forms_as_transformers_does():
    """Phi-3's checkpoints: LongRoPE as type "longrope", or its older names "su" and "yarn", the
    pre-training context at the top level (4096 when absent)."""
    config = get_preset("tiny-phi3-longrope")
    hf = config.to_hf_config()
    factors = {k: v for k, v in hf["rope_scaling"].items() if k.endswith("_factor")}
    for name in ("longrope", "su", "yarn"):
        hf["rope_scaling"] = {"type": name, **factors}
        assert ModelConfig.from_hf_config(hf) == config
    del hf["original_max_position_embeddings"]
    assert ModelConfig.from_hf_config(hf).rope_scaling["original_max_position_embeddings"] == 4096


@pytest.mark.parametrize("scaling,field", [
    ({"rope_type": "ntk-by-parts", "factor": 2.0}, "rope_scaling type 'ntk-by-parts'"),
    ({"rope_type": "dynamic"}, "factor"),
    ({"rope_type": "longrope", "long_factor": [1.0] * 8}, "short_factor"),
    ({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 7},
     "long_factor has 7 numbers; heads of 16 rotary dimensions need 8"),
    ({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": ["x"] * 8},
     "long_factor"),
])
def test_bad_rope_scaling_fails_at_load_naming_the_field(scaling, field, tmp_path):
    from mlx_core import load_model

    hf = {**get_preset("tiny-llama").to_hf_config(), "rope_scaling": scaling}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=field):
        load_model(tmp_path)


@pytest.mark.parametrize("preset,field,value", [
    ("tiny-deepseek-v2", "topk_method", "best_of"), ("tiny-deepseek-v2", "topk_method", "noaux_tc"),
    ("tiny-deepseek-v2", "scoring_func", "sigmoid"), ("tiny-deepseek-v3", "scoring_func", "tanh"),
    ("tiny-deepseek-v3", "topk_method", "greedy"), ("tiny-deepseek-v2", "norm_topk_prob", True),
    ("tiny-deepseek-v2", "moe_layer_freq", 0), ("tiny-deepseek-v3", "n_group", 3),
    ("tiny-deepseek-v3", "topk_group", 3), ("tiny-deepseek-v2", "hidden_act", "gelu"),
    ("tiny-deepseek-v2", "mlp_bias", True), ("tiny-deepseek-v2", "qk_rope_head_dim", 7)])
def test_unsupported_deepseek_fields_fail_at_load_naming_them(preset, field, value, tmp_path):
    from mlx_core import load_model

    hf = {**get_preset(preset).to_hf_config(), field: value}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=field):
        load_model(tmp_path)


def test_moe_routing_fields_are_checked_by_name():
    with pytest.raises(ValueError, match="topk_method must be one of"):
        get_preset("tiny-qwen3-moe").replace(topk_method="best_of")
    with pytest.raises(ValueError, match="scoring_func must be one of"):
        get_preset("tiny-qwen3-moe").replace(scoring_func="tanh")
    with pytest.raises(ValueError, match="attention_kind must be one of"):
        get_preset("tiny-llama").replace(attention_kind="linear")
    with pytest.raises(ValueError, match="kv_lora_rank"):
        get_preset("tiny-deepseek-v2").replace(kv_lora_rank=0)


def test_deepseek_dense_layers_follow_first_k_dense_replace_and_moe_layer_freq():
    """DeepSeek's rule: layer i is sparse when i >= first_k_dense_replace and i % moe_layer_freq
    == 0 (HF transformers ignores moe_layer_freq; every released checkpoint has 1)."""
    hf = {**get_preset("tiny-deepseek-v2").to_hf_config(), "num_hidden_layers": 6,
          "first_k_dense_replace": 2, "moe_layer_freq": 2}
    config = ModelConfig.from_hf_config(hf)
    assert [config.is_moe_layer(i) for i in range(6)] == [False, False, True, False, True, False]
    assert ModelConfig.from_hf_config(config.to_hf_config()) == config
    with pytest.raises(ValueError, match="mlp_only_layers"):
        config.replace(mlp_only_layers=(1, 5)).to_hf_config()


def test_mla_softmax_scale_takes_yarns_mscale_twice():
    """DeepSeek-V2-Lite: qk_head_dim 192 and YaRN factor 40, mscale_all_dim 0.707."""
    import math

    mscale = 0.1 * 0.707 * math.log(40) + 1.0
    assert get_preset("deepseek-v2-lite").attention_scale == pytest.approx(192**-0.5 * mscale**2)
