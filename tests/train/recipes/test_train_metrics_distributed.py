"""Step-metric rows (``TrainMetrics``) on 2 gloo processes describe the GLOBAL batch: the rows
rank 0 writes equal a one-process run's on the same global batches (loss, gradient norm,
tokens or items per second, dpo's training rewards), for DDP, FSDP2 and a plain Learner whose
processes' losses are their own. The processes are spawned here (not through torchrun) so that
both runs share a fake clock: the throughput columns then compare the token / item counts."""

import csv
import itertools
import json
import os
import socket
import time
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mlx_train import DistributedCallback, recipes
from mlx_train.callback import train_metrics
from mlx_train.callback.loggers import MetricsCSVLogger
from mlx_train.callback.train_metrics import TrainMetrics
from mlx_train.metrics import AvgMetric, accuracy

from ..helpers import make_learner
from .conftest import write_jsonl
from .test_dpo import style_pairs

# fp32 sums in another order (as tests/train/recipes/test_distributed_recipes.py measures)
TOLERANCE = 1e-5
WORKERS_TIMEOUT_S = 300

pytestmark = [pytest.mark.skipif(not dist.is_available(),
                                 reason="torch.distributed is not available"),
              pytest.mark.usefixtures("single_process_env")]


def fake_clock():
    """``time`` for ``train_metrics``: each ``perf_counter()`` call one second later. Runs
    with the same events then measure the same seconds, whatever the machine's load."""
    ticks = itertools.count()
    return types.SimpleNamespace(perf_counter=lambda: float(next(ticks)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def become_rank(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    train_metrics.time = fake_clock()


def on_two_processes(fn, *args) -> None:
    """``fn(rank, 2, port, *args)`` in 2 spawned processes; fails on an error or a hang."""
    ctx = mp.start_processes(fn, args=(2, free_port(), *args), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + WORKERS_TIMEOUT_S
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the 2 processes did not finish in {WORKERS_TIMEOUT_S} s (a rank left "
                        "out of a collective?)")


def read_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_same_rows(one: list[dict], two: list[dict], label: str) -> None:
    """Rows of a 1-process and a 2-process run: the same columns and values (peak memory is
    each run's own)."""
    assert two and len(two) == len(one), label
    assert list(two[0]) == list(one[0]), label
    for a, b in zip(one, two, strict=True):
        assert (b["step"], b["epoch"]) == (a["step"], a["epoch"]), label
        for key in a:
            if key in ("step", "epoch", "peak_mem_mib"):
                continue
            if a[key] == "" or b[key] == "":  # no norm for a last interval shorter than log_every
                assert a[key] == b[key], f"{label}, step {a['step']}: {key}"
                continue
            assert float(b[key]) == pytest.approx(float(a[key]), rel=TOLERANCE, abs=1e-7), \
                f"{label}, step {a['step']}: {key} 2 processes {b[key]} vs 1 process {a[key]}"
        assert float(b["peak_mem_mib"]) > 0


# -- the recipes (DDP, FSDP2, dpo) ------------------------------------------------------------
def _recipes_worker(rank, world, port, runs):
    become_rank(rank, world, port)
    try:
        for recipe, overrides in runs:
            recipes.run(recipe, overrides)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def finetune_overrides(tiny_overrides, out, *extra):
    """58 training items at a global batch of 8 (the last batch of 2 splits 1 + 1, so the
    processes hold different numbers of tokens), one epoch, a row every 3 steps (3, 6, then a
    shorter last interval)."""
    return [*[o for o in tiny_overrides if not o.startswith("output_dir=")], "data.bs=8",
            "epochs=1", "eval.exact_match=false", "optimizer.lr=3e-3", "logger=default",
            "logger.log_every=3", "logger.tensorboard=false", "save.checkpoint_every=0",
            f"output_dir={out}", *extra]


@pytest.mark.slow
def test_recipe_step_metric_rows_on_two_processes_equal_one_process_rows(
        tiny_overrides, tiny_model_dir, tmp_path, monkeypatch):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", style_pairs())
    dpo = ["model=pretrained", f"model.source={tiny_model_dir}", "data=preference",
           f"data.train_files={prefs}", "data.bs=8", "data.valid_pct=0.25", "epochs=1",
           "train.progress=false", "optimizer.lr=1e-2", "logger=default", "logger.log_every=2",
           "logger.tensorboard=false", "save.checkpoint_every=0"]
    runs = {  # label: recipe, overrides (the output_dir comes last)
        # DDP; the norm from GradientClip (grad_clip 1.0)
        "ddp": ("full_finetune", finetune_overrides(tiny_overrides, "{out}")),
        # FSDP2: the norm GradientClip measured (a replicated DTensor) ...
        "fsdp": ("full_finetune", finetune_overrides(tiny_overrides, "{out}",
                                                     "train.strategy=fsdp")),
        # ... and, without clipping, the norm of the sharded DTensor gradients (a collective)
        "fsdp-noclip": ("full_finetune", finetune_overrides(
            tiny_overrides, "{out}", "train.strategy=fsdp", "train.grad_clip=0")),
        # LoRA under DDP: the training rewards (batch_metrics) over both processes' pairs
        "dpo": ("dpo", [*dpo, "output_dir={out}"]),
    }

    def jobs(n):
        return [(recipe, [o.replace("{out}", str(tmp_path / f"{label}-{n}")) for o in overrides])
                for label, (recipe, overrides) in runs.items()]

    monkeypatch.setattr(train_metrics, "time", fake_clock())
    for recipe, overrides in jobs(1):
        recipes.run(recipe, overrides)
    on_two_processes(_recipes_worker, jobs(2))

    for label in runs:
        one = read_rows(tmp_path / f"{label}-1" / "train_metrics.csv")
        two = read_rows(tmp_path / f"{label}-2" / "train_metrics.csv")
        assert_same_rows(one, two, label)
    finetune = read_rows(tmp_path / "ddp-1" / "train_metrics.csv")
    assert [r["step"] for r in finetune] == ["3", "6", "8"] and "tokens_per_s" in finetune[0]
    rewards = read_rows(tmp_path / "dpo-2" / "train_metrics.csv")
    assert {"rewards/chosen", "rewards/accuracies", "rewards/margins"} <= set(rewards[0])


# -- a plain Learner: each process's loss is its own --------------------------------------------
def plain_learner(rank: int | None, out):
    """An MLP on 96 items at a global batch of 16; step metrics every 2 steps with a batch
    metric (accuracy), attached on rank 0 only (as the recipes do) or with one process."""
    torch.manual_seed(0)
    cbs = []
    if rank is not None:  # no loss_count: each process's loss is the mean over its own half
        cbs.append(DistributedCallback(split_batches=True))
    if not rank:
        metrics = TrainMetrics(log_every=2)
        metrics.batch_metrics = [AvgMetric(accuracy)]
        cbs += [metrics, MetricsCSVLogger(out / "steps.csv")]
    return make_learner(path=out, cbs=cbs)


def _learner_worker(rank, world, port, out):
    become_rank(rank, world, port)
    out = out / f"rank{rank}"
    out.mkdir(parents=True, exist_ok=True)
    try:
        learn = plain_learner(rank, out)
        with learn.no_logging():
            learn.fit(2, lr=1e-2)
        # the processes other than rank 0 took part, then let go of their TrainMetrics
        (out / "after_fit.json").write_text(json.dumps(
            {"train_metrics": learn.cb("train_metrics") is not None}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_learner_step_metric_rows_reduce_losses_items_and_batch_metrics(tmp_path, monkeypatch):
    monkeypatch.setattr(train_metrics, "time", fake_clock())
    learn = plain_learner(None, tmp_path / "one")
    with learn.no_logging():
        learn.fit(2, lr=1e-2)
    on_two_processes(_learner_worker, tmp_path / "two")

    one = read_rows(tmp_path / "one" / "steps.csv")
    two = read_rows(tmp_path / "two" / "rank0" / "steps.csv")
    assert list(one[0]) == ["step", "epoch", "loss", "lr", "grad_norm", "items_per_s",
                            "peak_mem_mib", "accuracy"]
    assert_same_rows(one, two, "plain Learner")
    assert not (tmp_path / "two" / "rank1" / "steps.csv").exists()  # rank 0 writes alone
    for rank in (0, 1):
        done = json.loads((tmp_path / "two" / f"rank{rank}" / "after_fit.json").read_text())
        assert done["train_metrics"] == (rank == 0)
