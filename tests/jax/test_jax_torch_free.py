"""``import mlx_jax``, loading and generation work with torch absent (blocked in a subprocess),
and give the torch zoo's logits (max |difference| <= 1e-4) through ``mlx_kernels.jax``'s hot ops
(torch-free: ``mlx_kernels`` loads its torch ops lazily)."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import torch

_BLOCK_TORCH = "import sys; sys.modules['torch'] = None  # `import torch` now raises ImportError\n"
# Between them: RMSNorm, RoPE, SwiGLU, q/k/v bias (qwen2); LayerNorm, GELU, learned positions
# (gpt2); MoE routing (mixtral).
_PRESETS = ("tiny-qwen2", "tiny-gpt2", "tiny-mixtral")


def _run(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCK_TORCH + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout)


def test_load_and_run_without_torch(tiny_pair, tmp_path):
    directories = {preset: str(tiny_pair(preset)[1]) for preset in _PRESETS}
    ids = [[3, 9, 27, 81, 115, 4, 12]]
    done = _run(f"""
        import json, numpy as np
        from flax import nnx
        import mlx_jax
        from mlx_jax import ops
        forward = nnx.jit(lambda m, x: m(x))
        for preset, directory in {directories!r}.items():
            model = mlx_jax.load_model(directory)
            np.save({str(tmp_path)!r} + f"/{{preset}}.npy", np.asarray(forward(model, np.array({ids}))))
        assert "torch" not in sys.modules or sys.modules["torch"] is None
        assert ops.rms_norm.__module__ == "mlx_kernels.jax"  # the shared ops, with no torch
        print(json.dumps(mlx_jax.generate(model, {ids[0]}, max_new_tokens=4, stop_token_ids=[])))
    """)
    assert done.returncode == 0, done.stderr
    for preset in _PRESETS:
        with torch.no_grad():
            ref = tiny_pair(preset)[0](torch.tensor(ids)).numpy()
        assert np.abs(np.load(tmp_path / f"{preset}.npy") - ref).max() <= 1e-4, preset
    assert len(json.loads(done.stdout.strip().splitlines()[-1])) == 4


def test_registering_the_plugin_imports_neither_jax_nor_torch():
    done = _run("""
        from mlx_core import registry
        from mlx_core.plugins import failed, load_plugins
        load_plugins()
        assert "jax" not in failed, failed  # (torch-based plugins fail here: torch is blocked)
        assert "flax" in registry.architectures.get("mixtral")
        print(sorted(m for m in ("jax", "flax", "torch") if sys.modules.get(m) is not None))
    """, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_training_and_lora_without_torch(tmp_path):
    """The chunked cross-entropy of mlx_kernels.jax gives the same loss with torch blocked as
    with torch importable, and LoRA files round-trip with no torch."""
    from flax import nnx

    import mlx_jax
    from mlx_core import get_preset

    ids = np.random.RandomState(0).randint(0, 128, (2, 10))
    model = mlx_jax.build_model(get_preset("tiny-llama"), seed=3)
    expected = float(nnx.jit(lambda m, x: m(x, labels=x))(model, ids))
    done = _run(f"""
        import json, numpy as np
        from flax import nnx
        import mlx_jax
        from mlx_core import get_preset
        from mlx_jax import lora, ops
        assert ops.fused_linear_cross_entropy.__module__ == "mlx_kernels.jax"
        model = mlx_jax.build_model(get_preset("tiny-llama"), seed=3)
        ids = np.array({ids.tolist()})
        loss = float(nnx.jit(lambda m, x: m(x, labels=x))(model, ids))
        lora.apply_lora(model, lora.LoraConfig(target_modules=["q_proj"], r=2))
        losses = mlx_jax.train(model, [ids] * 2, steps=2, lr=1e-2, trainable=lora.LoraParam)
        lora.save_lora(model, {str(tmp_path / "adapter")!r})
        again = lora.load_lora(mlx_jax.build_model(get_preset("tiny-llama"), seed=3),
                               {str(tmp_path / "adapter")!r})
        same = np.array_equal(np.asarray(model(ids)), np.asarray(again(ids)))
        assert "torch" not in sys.modules or sys.modules["torch"] is None
        print(json.dumps([loss, losses, same]))
    """)
    assert done.returncode == 0, done.stderr
    loss, losses, same = json.loads(done.stdout.strip().splitlines()[-1])
    assert abs(loss - expected) <= 1e-6 and abs(losses[0] - expected) <= 1e-6 and same
