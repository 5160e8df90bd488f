"""Per-package installs: mlx-core alone, in a fresh venv with no torch, gives a working `mlx`."""

import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_core_installs_and_runs_without_torch(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    mlx = env_dir / "bin" / "mlx"

    def run(*cmd):
        return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600)

    done = run(python, "-m", "pip", "install", "--quiet", "-e", ROOT / "packages" / "core")
    assert done.returncode == 0, done.stderr
    assert run(python, "-c", "import torch").returncode != 0, "torch must not be installed"
    listed = run(mlx, "models", "list")
    assert listed.returncode == 0, listed.stderr
    assert "smollm2-135m-instruct" in listed.stdout
    needs_torch = run(mlx, "generate", "--prompt", "hi")
    assert needs_torch.returncode == 1
    assert "mlx-core[torch]" in needs_torch.stdout + needs_torch.stderr
    imported = run(python, "-c", "import mlx_core; print(mlx_core.get_preset('tiny-llama').num_layers)")
    assert imported.stdout.strip() == "2", imported.stderr


def test_dev_requirements_name_every_package():
    lines = (ROOT / "requirements-dev.txt").read_text().splitlines()
    editable = {line.split()[1].split("[")[0] for line in lines if line.startswith("-e ")}
    folders = {str(p.parent.relative_to(ROOT)) for p in ROOT.glob("**/pyproject.toml")
               if p.parent != ROOT and not any(part.startswith(".") for part in p.parts)}
    assert editable == folders
