"""The optional parts of mlx-train, each behind an extra that says how to install it."""

from __future__ import annotations


def require_jax():
    """``mlx_jax`` (the Flax mirror that ``backend=jax`` runs on), or an ``ImportError`` naming
    the extra that installs it."""
    try:
        import mlx_jax
    except ImportError as e:
        raise ImportError(f"backend=jax needs mlx-jax ({e}): pip install 'mlx-train[jax]' (from a "
                          "checkout: pip install -e packages/jax_backend)") from None
    return mlx_jax


__all__ = ["require_jax"]
