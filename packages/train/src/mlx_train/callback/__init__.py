"""Training-loop callbacks: the base class and events, and the callbacks mlx_train ships."""

from mlx_train.callback.core import (
    EVENTS,
    Callback,
    CancelBackwardException,
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    CancelStepException,
    CancelTrainException,
    CancelValidException,
    TrainEvalCallback,
)
from mlx_train.callback.fp16 import MixedPrecision
from mlx_train.callback.loggers import CSVLogger
from mlx_train.callback.lr_finder import LRFinder, minimum, slide, steep, valley
from mlx_train.callback.preds import GatherPredsCallback
from mlx_train.callback.progress import ProgressCallback
from mlx_train.callback.recorder import Recorder
from mlx_train.callback.schedule import (
    ParamScheduler,
    SchedCos,
    SchedExp,
    SchedLin,
    SchedNo,
    SchedPoly,
    combine_scheds,
    combined_cos,
)
from mlx_train.callback.tracker import (
    EarlyStoppingCallback,
    ReduceLROnPlateau,
    SaveModelCallback,
    TerminateOnNaNCallback,
    TrackerCallback,
)
from mlx_train.callback.training import GradientAccumulation, GradientClip

__all__ = [
    "EVENTS", "CSVLogger", "Callback", "CancelBackwardException", "CancelBatchException",
    "CancelEpochException", "CancelFitException", "CancelStepException", "CancelTrainException",
    "CancelValidException", "EarlyStoppingCallback", "GatherPredsCallback", "GradientAccumulation",
    "GradientClip", "LRFinder", "MixedPrecision", "ParamScheduler", "ProgressCallback", "Recorder",
    "ReduceLROnPlateau", "SaveModelCallback", "SchedCos", "SchedExp", "SchedLin", "SchedNo",
    "SchedPoly", "TerminateOnNaNCallback", "TrackerCallback", "TrainEvalCallback", "combine_scheds",
    "combined_cos", "minimum", "slide", "steep", "valley",
]
