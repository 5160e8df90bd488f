"""``import mlx_core`` and its torch-free parts work with torch absent (blocked in a subprocess)."""

import subprocess
import sys
import textwrap

_BLOCK_TORCH = "import sys; sys.modules['torch'] = None  # `import torch` now raises ImportError\n"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCK_TORCH + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120)


def test_core_imports_and_registries_work_without_torch():
    done = _run("""
        import mlx_core
        from mlx_core import registry
        from mlx_core.plugins import load_plugins
        load_plugins()
        assert "smollm2-135m-instruct" in registry.model_sources
        assert "llama" in registry.architectures
        config = mlx_core.get_preset("smollm2-135m")
        assert config.to_hf_config()["num_hidden_layers"] == 30
        assert "torch" not in sys.modules or sys.modules["torch"] is None
        print("ok")
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_torch_api_says_which_extra_to_install():
    done = _run("""
        import mlx_core
        try:
            mlx_core.load_model
        except ImportError as e:
            print(e)
    """)
    assert done.returncode == 0, done.stderr
    assert "pip install 'mlx-core[torch]'" in done.stdout


def test_allocator_settings_take_effect_on_linux():
    done = _run("""
        from mlx_core.memory import tune_allocator
        print(tune_allocator())
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("True" if sys.platform.startswith("linux") else "False")


def test_framework_neutral_pieces_work_without_torch():
    """What torch, serve and JAX share lives torch-free in mlx_core: PEFT's configs and rules,
    the sampling options' checks, RoPE's scaling, the HF name maps and the loaders' check."""
    done = _run("""
        import numpy as np
        import mlx_core
        from mlx_core import checkpoint_numpy, peft_config, peft_rules, rope_scaling, sampling_options
        config = peft_config.LoraConfig(target_modules=["q_proj"], rank_pattern={"q_.*": 2})
        assert config.rank_and_alpha("model.layers.0.self_attn.q_proj") == (2, 8)
        assert peft_rules.choose_targets(["a.layers.0.q_proj", "a.layers.1.k_proj"], ["q_proj"]) \\
            == ["a.layers.0.q_proj"]
        assert peft_rules.parse_lora_key("base_model.model.x.q_proj.lora_B.weight") == ("x.q_proj", "lora_B")
        assert sampling_options.sampling_problems(0.5, 1.0, top_k=-1)
        scaled = rope_scaling.scaled_inverse_frequencies(np.ones(4, np.float32),
                                                         {"rope_type": "linear", "factor": 2.0}, np.where)
        assert scaled.dtype == np.float32 and (scaled == 0.5).all()
        gpt2 = mlx_core.get_preset("tiny-gpt2")
        table = checkpoint_numpy.hf_to_ours_numpy(gpt2, {"h.0.attn.c_attn.bias": np.arange(6.0)})
        assert list(table["model.layers.0.self_attn.v_proj.bias"]) == [4.0, 5.0]
        assert "torch" not in sys.modules or sys.modules["torch"] is None
        print("ok")
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
