"""Schedules, the 1cycle / flat-cos / fine-tune policies and the learning-rate finder, in one place.

The code lives in ``mlx_train.callback.schedule`` and ``mlx_train.callback.lr_finder``.
"""

from mlx_train.callback.lr_finder import (
    LRFinder,
    lr_find,
    minimum,
    plot_lr_find,
    slide,
    steep,
    valley,
)
from mlx_train.callback.schedule import (
    ParamScheduler,
    SchedCos,
    SchedExp,
    SchedLin,
    SchedNo,
    SchedPoly,
    combine_scheds,
    combined_cos,
    fine_tune,
    fit_flat_cos,
    fit_one_cycle,
)

__all__ = ["LRFinder", "ParamScheduler", "SchedCos", "SchedExp", "SchedLin", "SchedNo", "SchedPoly",
           "combine_scheds", "combined_cos", "fine_tune", "fit_flat_cos", "fit_one_cycle",
           "lr_find", "minimum", "plot_lr_find", "slide", "steep", "valley"]
