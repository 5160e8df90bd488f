"""Data-parallel training: 2 CPU processes under torchrun (gloo) end with the weights of 1
process at the same global batch (max difference <= 1e-6), each process trained on its own half
of every global batch; sharding and auto-detection units."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from mlx_train import Callback, DataLoaders, Learner
from mlx_train.data import Loader
from mlx_train.distributed import (
    DistributedCallback,
    ShardedBatchSampler,
    auto_callbacks,
    shard_loader,
    sharded_len,
)
from mlx_train.samplers import BucketSampler

from . import ddp_worker

TOLERANCE = 1e-6  # float32 sums in a different order (two half-batch means vs one mean)


def test_two_processes_under_torchrun_equal_one_process(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    worker = Path(ddp_worker.__file__)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(worker), str(tmp_path)],
                          capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ddp_worker.train(tmp_path, explicit_callback=True)  # 1 process, the same global batches

    two, one = load_file(str(tmp_path / "weights_2.safetensors")), \
        load_file(str(tmp_path / "weights_1.safetensors"))
    assert two.keys() == one.keys() and not any(k.startswith("module.") for k in two)
    diff = max(float((two[k] - one[k]).abs().max()) for k in two)
    print(f"max weight difference, 2 processes vs 1: {diff:.2e}")
    assert diff <= TOLERANCE
    moved = max(float((one[k] - v).abs().max()) for k, v in _initial_weights().items())
    assert moved > 1e-2  # the runs did train

    r0, r1, ref = (json.loads((tmp_path / f).read_text())
                   for f in ("rank0_of2.json", "rank1_of2.json", "rank0_of1.json"))
    assert "DistributedCallback" in r0["cbs"]  # added automatically from WORLD_SIZE
    per_rank, bs = ddp_worker.GLOBAL_BS // 2, ddp_worker.GLOBAL_BS
    steps = ddp_worker.N // bs * ddp_worker.EPOCHS
    assert len(r0["seen"]) == len(r1["seen"]) == steps * per_rank
    for s in range(steps):  # each global batch split in two disjoint halves
        a, b = r0["seen"][s * per_rank:(s + 1) * per_rank], r1["seen"][s * per_rank:(s + 1) * per_rank]
        assert not set(a) & set(b)
        assert sorted(a + b) == sorted(ref["seen"][s * bs:(s + 1) * bs])
    for epoch in range(ddp_worker.EPOCHS):  # every item once per epoch
        n = ddp_worker.N // 2
        assert sorted(r0["seen"][epoch * n:(epoch + 1) * n] + r1["seen"][epoch * n:(epoch + 1) * n]) \
            == list(range(ddp_worker.N))
    # the training loss is each rank's own; validation is unsharded: the same on every rank
    assert r0["valid"][1:] == r1["valid"][1:]
    assert r0["valid"][1:] == pytest.approx(ref["valid"][1:], abs=1e-5)


def _initial_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
    return model.state_dict()


def test_shard_loader_deals_items_and_checks_the_batch():
    ds = TensorDataset(torch.arange(20))
    loader = Loader(DataLoader(ds, batch_size=4, shuffle=False))
    shards = [shard_loader(loader, r, 2) for r in range(2)]
    assert [len(s) for s in shards] == [sharded_len(20, 4, 2)] * 2 == [5, 5]
    batches = [[b[0].tolist() for b in s] for s in shards]
    assert batches[0][0] == [0, 2] and batches[1][0] == [1, 3]  # global batch 0 is items 0..3
    with pytest.raises(ValueError, match="global batch and must divide"):
        shard_loader(Loader(DataLoader(ds, batch_size=5)), 0, 2)
    seeded = Loader(DataLoader(ds, batch_size=4, shuffle=True,
                               generator=torch.Generator().manual_seed(3)))
    a, b = (shard_loader(seeded, r, 2) for r in range(2))
    assert a.dl.sampler.seed == 3 and a.dl.sampler.shuffle  # the same permutation on all ranks
    assert sorted(x for s in (a, b) for batch in s for x in batch[0].tolist()) == list(range(20))


def test_sharded_batch_sampler_deals_whole_batches_evenly():
    sampler = BucketSampler(list(range(1, 22)), bs=4, shuffle=True, seed=0)
    all_batches = list(BucketSampler(list(range(1, 22)), bs=4, shuffle=True, seed=0))
    parts = [list(ShardedBatchSampler(BucketSampler(list(range(1, 22)), bs=4, seed=0), r, 2))
             for r in range(2)]
    assert len(all_batches) == 6 and [len(p) for p in parts] == [3, 3]
    assert parts[0] == all_batches[0::2] and parts[1] == all_batches[1::2]
    assert ShardedBatchSampler(sampler, 0, 4).__len__() == 1  # 6 // 4: a remainder is dropped


def test_auto_detection_from_the_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert auto_callbacks([]) == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert [type(c) for c in auto_callbacks([])] == [DistributedCallback]
    assert auto_callbacks([DistributedCallback()]) == []  # yours is kept, not doubled


def test_one_process_callback_only_redeals(tmp_path):
    from .ddp_worker import data

    train, valid = data()
    dls = DataLoaders.from_dsets(train, valid, bs=16, seed=1, n_inp=1)
    original = dls.train
    cb = DistributedCallback()
    seen = []
    learn = Learner(dls, torch.nn.Linear(6, 2), ddp_worker.loss_func, progress=False, cbs=[cb],
                    path=tmp_path)
    with learn.no_logging():
        learn.fit(1, 1e-3, cbs=Callback(before_batch=lambda: seen.append(learn.dl.dl.sampler)))
    assert dls.train is original and cb.ddp is None  # put back after the fit
    assert isinstance(seen[0], DistributedSampler) and seen[0].num_replicas == 1
