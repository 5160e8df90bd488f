"""mlx-serve: a paged-KV continuous-batching engine and an OpenAI-compatible server.

Not implemented yet: this package is installable so the workspace composes, and provides no
features until its issue lands (see README.md).
"""

__version__ = "0.1.0"
