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
    with pytest.raises(ValueError, match=r"'qwen3_moe'.*supported: .*olmo2.*\(closest: qwen3"):
        ModelConfig.from_hf_config({"model_type": "qwen3_moe"})


def test_reads_transformers5_rope_parameters():
    hf = get_preset("tiny-llama3").to_hf_config()
    scaling = hf.pop("rope_scaling")
    hf["rope_parameters"] = {**scaling, "rope_theta": hf.pop("rope_theta")}
    assert ModelConfig.from_hf_config(hf) == get_preset("tiny-llama3")
