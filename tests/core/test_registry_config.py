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
