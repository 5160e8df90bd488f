"""Plugin discovery: every installed package registers itself through ``mlx.plugins``."""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

CORE = "mlx_core.registrations:register"  # mlx-core's own registrations (its CLI commands among them)
_loaded = False
failed: dict[str, str] = {}  # plugin name -> error, shown by ``mlx doctor``


def load_plugins() -> None:
    """Call each ``mlx.plugins`` entry point once. mlx-core's own runs first, and an error there
    is raised; another plugin's is reported and kept in ``failed``.

    mlx-core's registrations come through its entry point too, not an import: they register the
    CLI commands, which call ``load_plugins`` themselves."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    found = sorted(entry_points(group="mlx.plugins"), key=lambda e: (e.value != CORE, e.name))
    if not found or found[0].value != CORE:
        raise RuntimeError("mlx-core's mlx.plugins entry point is missing: install mlx-core (from a "
                           "checkout: pip install -e packages/core)")
    found[0].load()()
    for ep in found[1:]:
        if ep.value.startswith("mlx_core."):
            continue
        try:
            ep.load()()
        except Exception as e:  # one broken plugin must not take the whole CLI down
            failed[ep.name] = f"{type(e).__name__}: {e}"
            print(f"mlx: plugin {ep.name!r} failed to load: {failed[ep.name]}", file=sys.stderr)
