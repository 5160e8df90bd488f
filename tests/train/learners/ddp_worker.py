"""Run by test_distributed.py under torchrun (2 processes) and in-process (1 process): trains the
same model on the same data and writes the final weights (rank 0) and what each rank saw."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from mlx_train import DataLoaders, Learner, accuracy
from mlx_train.distributed import DistributedCallback, world_info

N, GLOBAL_BS, EPOCHS = 96, 16, 3


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N + 32, 6, generator=g)
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).long()
    # the item index rides along as a second target so each rank can report what it saw
    idx = torch.arange(N + 32)
    return TensorDataset(x[:N], y[:N], idx[:N]), TensorDataset(x[N:], y[N:], idx[N:])


def loss_func(pred, y, idx):
    return nn.functional.cross_entropy(pred, y)


def first_target_accuracy(pred, y, idx):
    return accuracy(pred, y)


def train(out: Path, explicit_callback: bool) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 2))
    train_ds, valid_ds = data()
    dls = DataLoaders.from_dsets(train_ds, valid_ds, bs=GLOBAL_BS, seed=1, n_inp=1)
    seen: list[int] = []
    cbs = [DistributedCallback()] if explicit_callback else []
    learn = Learner(dls, model, loss_func, metrics=first_target_accuracy, progress=False, cbs=cbs)

    def log_items():
        if learn.training:
            seen.extend(learn.yb[1].tolist())

    from mlx_train import Callback

    with learn.no_logging():
        learn.fit_one_cycle(EPOCHS, 1e-2, cbs=Callback(after_batch=log_items))
    rank, world, _ = world_info()
    info = {"rank": rank, "world": world, "seen": seen,
            "cbs": [type(c).__name__ for c in learn.cbs],
            "valid": learn.recorder.values[-1], "keys": sorted(learn.model.state_dict())}
    (out / f"rank{rank}_of{world}.json").write_text(json.dumps(info))
    if rank == 0:
        save_file({k: v.contiguous() for k, v in learn.model.state_dict().items()},
                  str(out / f"weights_{world}.safetensors"))
    return info


if __name__ == "__main__":
    train(Path(sys.argv[1]), explicit_callback=len(sys.argv) > 2)
