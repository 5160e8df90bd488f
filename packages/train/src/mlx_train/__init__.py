"""mlx-train: the fastai-style Learner (callbacks, schedules, LR finder, discriminative learning
rates, freezing), metrics, data loaders, resumable training state and inference export.

Plain PyTorch, no global state. See README.md and docs/train.md.
"""

from mlx_train.augment import (
    Augment,
    ColourJitter,
    Flip,
    RandomResizedCrop,
    Rotate,
    aug_transforms,
)
from mlx_train.callback import (
    EVENTS,
    Callback,
    CancelBackwardException,
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    CancelStepException,
    CancelTrainException,
    CancelValidException,
    CSVLogger,
    EarlyStoppingCallback,
    GatherPredsCallback,
    GradientAccumulation,
    GradientClip,
    LRFinder,
    MixedPrecision,
    ParamScheduler,
    ProgressCallback,
    Recorder,
    ReduceLROnPlateau,
    SaveModelCallback,
    SchedCos,
    SchedExp,
    SchedLin,
    SchedNo,
    SchedPoly,
    TerminateOnNaNCallback,
    TrackerCallback,
    TrainEvalCallback,
    combine_scheds,
    combined_cos,
    minimum,
    slide,
    steep,
    valley,
)
from mlx_train.callback.loggers import (
    MLflowCallback,
    SinkCallback,
    TensorBoardCallback,
    WandbCallback,
)
from mlx_train.callback.mixup import CutMix, MixUp, ProgressiveResize
from mlx_train.data import DataLoaders, Loader, Normalize, RandomSplitter, StratifiedSplitter
from mlx_train.distributed import DistributedCallback
from mlx_train.learner import Learner, load_learner
from mlx_train.losses import CausalLMLoss
from mlx_train.metrics import (
    RMSE,
    AccumMetric,
    AvgLoss,
    AvgMetric,
    AvgSmoothLoss,
    F1Score,
    Metric,
    Perplexity,
    R2Score,
    accuracy,
    error_rate,
    mae,
    mse,
    perplexity,
    r2_score,
    rmse,
    top_k_accuracy,
)
from mlx_train.optimizer import LayerGroupOptimizer, trainable_params
from mlx_train.samplers import BucketSampler, weighted_sampler
from mlx_train.tabular import TabularDataLoaders, tabular_learner
from mlx_train.text import TextDataLoaders, text_classifier_learner
from mlx_train.vision import ImageDataLoaders, vision_learner

__version__ = "0.1.0"

__all__ = [
    "EVENTS", "RMSE", "AccumMetric", "AvgLoss", "AvgMetric", "AvgSmoothLoss", "CSVLogger",
    "Callback", "CancelBackwardException", "CancelBatchException", "CancelEpochException",
    "CancelFitException", "CancelStepException", "CancelTrainException", "CancelValidException",
    "CausalLMLoss", "DataLoaders", "EarlyStoppingCallback", "F1Score", "GatherPredsCallback",
    "GradientAccumulation", "GradientClip", "LRFinder", "LayerGroupOptimizer", "Learner", "Loader",
    "Metric", "MixedPrecision", "Normalize", "ParamScheduler", "Perplexity", "ProgressCallback",
    "R2Score", "RandomSplitter", "Recorder", "ReduceLROnPlateau", "SaveModelCallback", "SchedCos",
    "SchedExp", "SchedLin", "SchedNo", "SchedPoly", "StratifiedSplitter", "TerminateOnNaNCallback",
    "TrackerCallback", "TrainEvalCallback", "accuracy", "combine_scheds", "combined_cos",
    "error_rate", "load_learner", "mae", "minimum", "mse", "perplexity", "r2_score", "rmse", "slide",
    "steep", "top_k_accuracy", "trainable_params", "valley",
    # data augmentation, samplers, vision / tabular / text learners, loggers, distributed
    "Augment", "BucketSampler", "ColourJitter", "DistributedCallback", "Flip", "ImageDataLoaders",
    "CutMix", "MLflowCallback", "MixUp", "ProgressiveResize", "RandomResizedCrop", "Rotate",
    "SinkCallback",
    "TabularDataLoaders", "TensorBoardCallback", "TextDataLoaders", "WandbCallback",
    "aug_transforms", "tabular_learner", "text_classifier_learner", "vision_learner",
    "weighted_sampler",
]
