"""matplotlib, when installed (it is optional): plots are written to PNG files, never shown.

Figures are built with ``matplotlib.figure.Figure`` directly, not pyplot, so plotting changes no
global matplotlib state (backend, current figure).
"""

from __future__ import annotations

import warnings


def new_figure(feature: str):
    """A fresh ``Figure`` and its axes, or ``(None, None)`` with a warning naming ``feature``
    when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn(f"{feature}: matplotlib is not installed, so no plot was written "
                      "(pip install matplotlib, or pip install 'mlx-train[plot]')", stacklevel=3)
        return None, None
    fig = Figure()
    return fig, fig.subplots()
