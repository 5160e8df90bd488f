import pytest
import torch

import mlx_kernels
from mlx_kernels.dispatch import backend_for


def test_auto_uses_references_on_cpu(monkeypatch):
    monkeypatch.delenv("MLX_KERNELS", raising=False)
    assert backend_for("cpu") == "torch"


def test_torch_forces_references(monkeypatch):
    monkeypatch.setenv("MLX_KERNELS", "torch")
    assert backend_for("cpu") == "torch"


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("MLX_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend_for("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend_for("cpu") == "triton"


def test_invalid_setting_names_the_choices(monkeypatch):
    monkeypatch.setenv("MLX_KERNELS", "cuda")
    with pytest.raises(ValueError, match="auto, torch, triton"):
        mlx_kernels.rms_norm(torch.ones(2, 4), torch.ones(4))


def test_describe_reports_backends(monkeypatch):
    monkeypatch.delenv("MLX_KERNELS", raising=False)
    info = mlx_kernels.describe()
    assert info["backend on cpu"] == "torch" and "triton" in info


def test_import_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, mlx_kernels; print('triton' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr
