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
