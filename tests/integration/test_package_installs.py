"""Per-package installs in fresh venvs with no torch: mlx-core alone gives a working `mlx`;
mlx-jax (with mlx-kernels' JAX ops) loads, trains and runs the JAX zoo."""

import json
import subprocess
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def run(*cmd, timeout=600):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)


def fresh_venv(env_dir: Path, *requirements) -> Path:
    """A new venv (no system site-packages) with ``requirements`` (pip arguments) installed with
    their dependencies, as a user would; returns its python. Torch must not come with them."""
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # --no-compile: byte-compiling transformers & co. is a third of the install and not tested
    done = run(python, "-m", "pip", "install", "--quiet", "--no-compile", *requirements)
    assert done.returncode == 0, done.stderr
    assert run(python, "-c", "import torch").returncode != 0, "torch must not be installed"
    return python


def test_core_installs_and_runs_without_torch(tmp_path):
    python = fresh_venv(tmp_path / "venv", "-e", ROOT / "packages" / "core")
    mlx = python.parent / "mlx"
    listed = run(mlx, "models", "list")
    assert listed.returncode == 0, listed.stderr
    assert "smollm2-135m-instruct" in listed.stdout
    needs_torch = run(mlx, "generate", "--prompt", "hi")
    assert needs_torch.returncode == 1
    assert "mlx-core[torch]" in needs_torch.stdout + needs_torch.stderr
    imported = run(python, "-c", "import mlx_core; print(mlx_core.get_preset('tiny-llama').num_layers)")
    assert imported.stdout.strip() == "2", imported.stderr


def test_jax_side_installs_and_runs_without_torch(tmp_path):
    """mlx-jax's dependencies (mlx-core, mlx-kernels[jax], jax, flax, optax) resolve without
    torch, and ``mlx_kernels.jax`` and the Flax zoo (forward, loss, gradient, generation) run
    there, its ops coming from mlx_kernels.jax; the torch ops of ``mlx_kernels`` say what to
    install."""
    python = fresh_venv(tmp_path / "venv", "-e", ROOT / "packages" / "core",
                        "-e", f"{ROOT / 'kernels'}[jax]", "-e", ROOT / "packages" / "jax_backend")
    code = textwrap.dedent("""
        import json, sys
        import jax, jax.numpy as jnp, numpy as np
        from flax import nnx
        import mlx_kernels.jax as kj
        import mlx_jax
        from mlx_core import get_preset
        from mlx_jax import ops

        x = jnp.arange(24.0).reshape(2, 12)
        norm = jax.jit(kj.rms_norm)(x, jnp.ones(12))
        model = mlx_jax.build_model(get_preset("tiny-llama"))
        ids = np.array([[1, 2, 3, 4, 5]])
        logits = nnx.jit(lambda m, i: m(i))(model, ids)
        loss, grads = nnx.value_and_grad(lambda m: m(ids, labels=ids))(model)
        tokens = mlx_jax.generate(model, [1, 2, 3], max_new_tokens=3, stop_token_ids=[])
        try:
            from mlx_kernels import rms_norm  # noqa: F401  (the torch op)
            torch_op = "imported"
        except ImportError as e:
            torch_op = str(e)
        print(json.dumps({
            "torch_loaded": "torch" in sys.modules,
            "ops_from": {ops.rms_norm.__module__, ops.attention.__module__,
                         ops.fused_linear_cross_entropy.__module__}.pop(),
            "norm_rms": float(jnp.sqrt(jnp.mean(norm * norm, axis=-1)).min()),
            "logits": list(logits.shape), "loss": float(loss), "tokens": len(tokens),
            "finite_grads": all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads)),
            "torch_op": torch_op,
        }))
    """)
    done = run(python, "-c", code)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["torch_loaded"] is False
    assert out["ops_from"] == "mlx_kernels.jax"
    assert abs(out["norm_rms"] - 1.0) < 1e-3  # rows normalised to unit RMS
    assert out["logits"] == [1, 5, 128] and 0 < out["loss"] < 10 and out["finite_grads"]
    assert out["tokens"] == 3
    assert "pip install 'mlx-kernels[torch]'" in out["torch_op"]
    doctor = run(python.parent / "mlx", "doctor")  # reports kernels without torch, too
    assert doctor.returncode == 0, doctor.stderr
    assert "backend on cpu" in doctor.stdout


def test_dev_requirements_name_every_package():
    lines = (ROOT / "requirements-dev.txt").read_text().splitlines()
    editable = {line.split()[1].split("[")[0] for line in lines if line.startswith("-e ")}
    folders = {str(p.parent.relative_to(ROOT)) for p in ROOT.glob("**/pyproject.toml")
               if p.parent != ROOT and not any(part.startswith(".") for part in p.parts)}
    assert editable == folders


def test_torch_users_of_kernels_ask_for_its_torch_extra():
    """mlx-kernels has no base dependencies; what runs its torch ops must pull its [torch] extra
    (adapters, train and serve get it through mlx-core[torch])."""
    import tomllib

    def deps(folder):
        project = tomllib.loads((ROOT / folder / "pyproject.toml").read_text())["project"]
        return project.get("dependencies", []), project.get("optional-dependencies", {})

    base, extras = deps("kernels")
    assert base == [] and any(d.startswith("torch") for d in extras["torch"])
    assert "mlx-kernels[torch]" in deps("packages/core")[1]["torch"]
    for folder in ("packages/adapters", "packages/train", "packages/serve"):
        assert "mlx-core[torch]" in deps(folder)[0], folder
    assert "mlx-kernels[jax]" in deps("packages/jax_backend")[0]
