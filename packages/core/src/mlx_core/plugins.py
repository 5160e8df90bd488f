"""Plugin discovery: every installed package registers itself through ``mlx.plugins``."""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

_loaded = False
failed: dict[str, str] = {}  # plugin name -> error, shown by ``mlx doctor``


def load_plugins() -> None:
    """Call each ``mlx.plugins`` entry point once. mlx-core's own runs first."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from mlx_core.plugin import register

    register()
    for ep in sorted(entry_points(group="mlx.plugins"), key=lambda e: e.name):
        if ep.value.startswith("mlx_core."):
            continue
        try:
            ep.load()()
        except Exception as e:  # one broken plugin must not take the whole CLI down
            failed[ep.name] = f"{type(e).__name__}: {e}"
            print(f"mlx: plugin {ep.name!r} failed to load: {failed[ep.name]}", file=sys.stderr)
