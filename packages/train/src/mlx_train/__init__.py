"""mlx-train: the fastai-style Learner (callbacks, schedules, LR finder, discriminative learning
rates, freezing), metrics, data loaders, resumable training state and inference export.

Plain PyTorch, no global state. See README.md and docs/train.md.
"""

from mlx_core.lazy import lazy_exports

# name -> the module that defines it, imported at first access: the plugin entry point imports
# this package at every `mlx` command's start, and these modules import torch (~2 s)
_EXPORTS = {
    **dict.fromkeys(
        ["Augment", "ColourJitter", "Flip", "RandomResizedCrop", "Rotate", "aug_transforms"],
        "mlx_train.augment",
    ),
    **dict.fromkeys(
        [
            "EVENTS",
            "Callback",
            "CancelBackwardException",
            "CancelBatchException",
            "CancelEpochException",
            "CancelFitException",
            "CancelStepException",
            "CancelTrainException",
            "CancelValidException",
            "CSVLogger",
            "EarlyStoppingCallback",
            "GatherPredsCallback",
            "GradientAccumulation",
            "GradientClip",
            "LRFinder",
            "MixedPrecision",
            "ParamScheduler",
            "ProgressCallback",
            "Recorder",
            "ReduceLROnPlateau",
            "SaveModelCallback",
            "SchedCos",
            "SchedExp",
            "SchedLin",
            "SchedNo",
            "SchedPoly",
            "TerminateOnNaNCallback",
            "TrackerCallback",
            "TrainEvalCallback",
            "combine_scheds",
            "combined_cos",
            "minimum",
            "slide",
            "steep",
            "valley",
        ],
        "mlx_train.callback",
    ),
    **dict.fromkeys(
        ["MLflowCallback", "SinkCallback", "TensorBoardCallback", "WandbCallback"],
        "mlx_train.callback.loggers",
    ),
    **dict.fromkeys(["CutMix", "MixUp", "ProgressiveResize"], "mlx_train.callback.mixup"),
    **dict.fromkeys(
        ["DataLoaders", "Loader", "Normalize", "RandomSplitter", "StratifiedSplitter"],
        "mlx_train.data",
    ),
    **dict.fromkeys(["DistributedCallback"], "mlx_train.distributed"),
    **dict.fromkeys(["Learner", "load_learner"], "mlx_train.learner"),
    **dict.fromkeys(["CausalLMLoss"], "mlx_train.losses"),
    **dict.fromkeys(
        [
            "RMSE",
            "AccumMetric",
            "AvgLoss",
            "AvgMetric",
            "AvgSmoothLoss",
            "F1Score",
            "Metric",
            "Perplexity",
            "R2Score",
            "accuracy",
            "error_rate",
            "mae",
            "mse",
            "perplexity",
            "r2_score",
            "rmse",
            "top_k_accuracy",
        ],
        "mlx_train.metrics",
    ),
    **dict.fromkeys(["LayerGroupOptimizer", "trainable_params"], "mlx_train.optimizer"),
    **dict.fromkeys(["BucketSampler", "weighted_sampler"], "mlx_train.samplers"),
    **dict.fromkeys(["TabularDataLoaders", "tabular_learner"], "mlx_train.tabular"),
    **dict.fromkeys(["TextDataLoaders", "text_classifier_learner"], "mlx_train.text"),
    **dict.fromkeys(["ImageDataLoaders", "vision_learner"], "mlx_train.vision"),
}

__version__ = "0.1.0"
__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
