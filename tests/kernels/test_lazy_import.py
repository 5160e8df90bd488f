"""``import mlx_kernels`` is lazy: the torch ops load on first access, ``mlx_kernels.jax`` works
with torch absent, and every public name still resolves to what the eager package gave."""

import subprocess
import sys
import textwrap

import mlx_kernels

_BLOCK_TORCH = "import sys; sys.modules['torch'] = None  # `import torch` now raises ImportError\n"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCK_TORCH + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300)


def test_jax_ops_work_with_torch_blocked():
    done = _run("""
        import jax, jax.numpy as jnp
        import mlx_kernels
        import mlx_kernels.jax as kj
        from mlx_kernels.nf4_format import NF4_CODEBOOK
        out = jax.jit(kj.rms_norm)(jnp.full((2, 8), 3.0), jnp.ones(8))
        assert abs(float(out.max()) - 1.0) < 1e-5
        print(mlx_kernels.describe()["backend on cpu"], len(NF4_CODEBOOK))
        try:
            mlx_kernels.rms_norm
        except ImportError as e:
            print(e)
    """)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "torch 16"
    assert "pip install 'mlx-kernels[torch]'" in lines[1]


def test_every_public_name_resolves_to_its_op():
    done = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys, types
        import mlx_kernels
        assert "torch" not in sys.modules  # nothing loaded yet
        # importing a submodule named like its op must not hide the op
        from mlx_kernels.rms_norm import rms_norm_reference  # noqa: F401
        from mlx_kernels import rms_norm
        assert callable(rms_norm) and not isinstance(rms_norm, types.ModuleType)
        assert mlx_kernels.rms_norm is rms_norm
        for name in mlx_kernels.__all__:
            value = getattr(mlx_kernels, name)
            assert not isinstance(value, types.ModuleType), name
        assert isinstance(mlx_kernels.nf4, types.ModuleType)  # as the eager package had it
        print(sorted(set(mlx_kernels.__all__) - set(dir(mlx_kernels))))
    """)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_unknown_names_raise_attribute_error():
    assert not hasattr(mlx_kernels, "no_such_op")
    assert "swiglu" in dir(mlx_kernels)
