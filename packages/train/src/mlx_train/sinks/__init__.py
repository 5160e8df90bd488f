"""One logging pipeline: a ``Sink`` receives a run's rows (hyper-parameters at ``open``, step
rows, epoch rows, ``close``) whoever trains: the Learner (``mlx_train.SinkCallback`` and the
logger callbacks built on it), the recipes and the JAX loop (``Sinks``).

- ``CSVSink``: step rows to ``train_metrics.csv``, epoch rows to ``history.csv``;
- ``TensorBoardSink``, ``MLflowSink``, ``WandbSink``: the trackers (each needs its package);
- ``ConsoleSink``: the epoch table on a rich console.
"""

from mlx_train.sinks.base import MissingPackage, Sink, Sinks, epoch_scalars, require
from mlx_train.sinks.console import ConsoleSink
from mlx_train.sinks.csv_file import CSVSink, CSVTable
from mlx_train.sinks.mlflow import MLflowSink
from mlx_train.sinks.tensorboard import TensorBoardSink
from mlx_train.sinks.wandb import WandbSink

__all__ = ["CSVSink", "CSVTable", "ConsoleSink", "MLflowSink", "MissingPackage", "Sink", "Sinks",
           "TensorBoardSink", "WandbSink", "epoch_scalars", "require"]
