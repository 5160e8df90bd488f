"""What a recipe does differently under ``torchrun`` (``mlx train RECIPE --nproc N``).

Every process runs the whole recipe with the same config. The pieces here keep them in step:

- ``start``: the process group, before the first decision the processes must share;
- ``agree``: rank 0 checks (e.g. "is there a checkpoint to resume?") and every process raises
  the same error or none, so no process trains while another has stopped;
- ``callbacks``: the Learner's ``DistributedCallback`` with the global-batch semantics (each
  process takes a slice of the batch one process would take; losses weighted by tokens), and
  without a DDP wrapper when the model is sharded by FSDP2 (``train.strategy=fsdp``).

Only rank 0 writes files and prints (``is_main_process``); ``mlx_train.state`` saves from
rank 0 only. With one process (no ``torchrun``) all of this is a no-op.
"""

from __future__ import annotations

import torch.distributed as dist
from omegaconf import DictConfig

from mlx_train.distributed import (
    DistributedCallback,
    is_distributed_env,
    is_main_process,
    setup_distributed,
    world_info,
)
from mlx_train.runner.config import STRATEGIES


def start() -> tuple[int, int]:
    """``(rank, world)``; under ``torchrun`` (``WORLD_SIZE > 1``) the process group is started
    first (gloo on CPU, nccl on CUDA)."""
    if is_distributed_env():
        setup_distributed()
    rank, world, _ = world_info()
    return rank, world


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def agree(check) -> None:
    """Run ``check()`` on rank 0 and raise its exception (or nothing) on every process."""
    if not distributed():
        check()
        return
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            check()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            box[0] = e
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise box[0]


def barrier() -> None:
    if distributed():
        dist.barrier()


def strategy(cfg: DictConfig) -> str:
    return cfg.get("train", {}).get("strategy", "ddp") or "ddp"


def callbacks(cfg: DictConfig) -> list:
    """``[DistributedCallback(...)]`` for a multi-process run (see the module doc), else ``[]``."""
    if not distributed():
        return []
    return [DistributedCallback(split_batches=True, loss_count="auto",
                                ddp=strategy(cfg) != "fsdp")]


__all__ = ["STRATEGIES", "agree", "barrier", "callbacks", "distributed", "is_main_process",
           "start", "strategy"]
