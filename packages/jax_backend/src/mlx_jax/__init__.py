"""mlx-jax: the Flax NNX mirror of the model zoo, weight conversion, jit generation, training and sharding.

Not implemented yet: this package is installable so the workspace composes, and provides no
features until its issue lands (see README.md).
"""

__version__ = "0.1.0"
