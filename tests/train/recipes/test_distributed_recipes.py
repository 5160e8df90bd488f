"""The recipes on several processes: ``mlx train RECIPE --nproc 2`` (2 CPU processes under
torchrun, gloo) ends with the weights and losses of ONE process at the same global batch:
DDP for full_finetune and lora_finetune, FSDP2 (``train.strategy=fsdp``) for full_finetune,
including a resumed FSDP run. Only rank 0 writes: the run directory holds the same files as a
one-process run's. A sweep (``-m --nproc 2``) runs each job that way. Units: batch splitting,
loss weighting, the errors."""

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

from mlx_core.cli.app import build_app
from mlx_train import recipes
from mlx_train.data import Loader
from mlx_train.distributed import SplitBatchSampler, split_loader
from mlx_train.recipes import RecipeConfigError
from mlx_train.runner.launch import command, launch
from mlx_train.samplers import BucketSampler

# fp32 sums in another order (two half-batch token sums, then an average over the processes,
# vs one mean); measured: up to ~2e-7 on these runs
TOLERANCE = 1e-5

pytestmark = [pytest.mark.skipif(not torch.distributed.is_available(),
                                 reason="torch.distributed is not available"),
              pytest.mark.usefixtures("single_process_env")]


def overrides_for(base, out, *extra):
    """Fast runs: 58 training items at a global batch of 8 (the last batch of 2 splits 1 + 1,
    so the processes hold different numbers of tokens), 2 epochs, no generation."""
    return [*[o for o in base if not o.startswith("output_dir=")], "data.bs=8", "epochs=2",
            "eval.exact_match=false", "optimizer.lr=3e-3", f"output_dir={out}", *extra]


def files(run):
    return sorted(str(p.relative_to(run)) for p in run.rglob("*")
                  if p.is_file() and "tensorboard" not in p.parts)


def max_diff(a_file, b_file) -> float:
    a, b = load_file(str(a_file)), load_file(str(b_file))
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def metrics_of(run):
    return json.loads((run / "metrics.json").read_text())


def assert_same_run(one, two):
    m1, m2 = metrics_of(one), metrics_of(two)
    for key in ("train_loss", "valid_loss"):
        assert m2[key] == pytest.approx(m1[key], abs=TOLERANCE), key
    assert m2["epochs"] == m1["epochs"]
    # one set of files (rank 0's), named as a one-process run names them, no temporaries
    assert files(two) == files(one)
    assert len((two / "history.csv").read_text().splitlines()) == \
        len((one / "history.csv").read_text().splitlines())


@pytest.mark.slow
def test_full_finetune_ddp_on_two_processes_equals_one(tiny_overrides, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    recipes.run("full_finetune", overrides_for(tiny_overrides, one))
    result = CliRunner().invoke(build_app(), ["train", "full_finetune", "--nproc", "2",
                                              *overrides_for(tiny_overrides, two)])
    assert result.exit_code == 0, result.output
    assert_same_run(one, two)
    diff = max_diff(one / "model" / "model.safetensors", two / "model" / "model.safetensors")
    moved = max_diff(one / "model" / "model.safetensors",
                     tiny_overrides[1].split("=", 1)[1] + "/model.safetensors")
    print(f"full_finetune DDP: max weight difference 1 vs 2 processes {diff:.2e}")
    assert diff <= TOLERANCE and moved > 1e-3  # equal, and the runs did train
    assert max_diff(one / "checkpoints" / "last.safetensors",
                    two / "checkpoints" / "last.safetensors") <= TOLERANCE  # optimizer too


@pytest.mark.slow
def test_full_finetune_fsdp_equals_one_process_and_resumes(tiny_overrides, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # a constant lr: the schedule of a run stopped after epoch 1 is that of a 2-epoch run;
    # logger=csv: no TensorBoard to import in 5 processes
    fast = ("scheduler=constant", "logger=csv")
    recipes.run("full_finetune", overrides_for(tiny_overrides, one, *fast))
    # FSDP2 on 2 processes: one epoch, then resumed from the gathered checkpoint for the second
    first = launch("full_finetune", overrides_for(tiny_overrides, two, "epochs=1", *fast,
                                                   "train.strategy=fsdp"), nproc=2)
    assert first["epochs"] == 1
    (two / "metrics.json").unlink()  # what a run stopped after its first epoch leaves
    launch("full_finetune", overrides_for(tiny_overrides, two, *fast, "train.strategy=fsdp",
                                          "resume=true"), nproc=2)
    assert_same_run(one, two)
    diff = max_diff(one / "model" / "model.safetensors", two / "model" / "model.safetensors")
    print(f"full_finetune FSDP2 (resumed): max weight difference 1 vs 2 processes {diff:.2e}")
    assert diff <= TOLERANCE
    saved = json.loads((two / "model" / "config.json").read_text())
    assert saved == json.loads((one / "model" / "config.json").read_text())


@pytest.mark.slow
def test_lora_finetune_ddp_on_two_processes_equals_one(tiny_overrides, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ("adapter.r=4", "optimizer.lr=1e-2", "train.grad_accum=2")  # accumulation too
    recipes.run("lora_finetune", overrides_for(tiny_overrides, one, *extra))
    launch("lora_finetune", overrides_for(tiny_overrides, two, *extra), nproc=2)
    assert_same_run(one, two)
    diff = max_diff(one / "adapter" / "adapter_model.safetensors",
                    two / "adapter" / "adapter_model.safetensors")
    print(f"lora_finetune DDP: max adapter difference 1 vs 2 processes {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.slow
def test_a_sweep_runs_each_job_on_two_processes_then_prints_the_table(tiny_overrides, tmp_path):
    out = tmp_path / "sweep"
    fixed = [o for o in overrides_for(tiny_overrides, out, "epochs=1", "adapter.r=4",
                                      "logger=csv", "save.checkpoint_every=0")
             if not o.startswith("optimizer.lr=")]
    result = CliRunner().invoke(build_app(), ["train", "lora_finetune", "--nproc", "2", "-m",
                                              *fixed, "optimizer.lr=3e-3,1e-2"],
                                env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "2 job(s) of lora_finetune on 2 processes each" in result.output
    assert re.search(r"┃ # +┃ optimizer.lr +┃ train_loss +┃ valid_loss", result.output)
    losses = []
    for i, lr in enumerate(("0.003", "0.01")):  # each job in its own output_dir/<job>
        run = out / str(i)
        assert f"lr: {float(lr)}" in (run / "config.yaml").read_text()
        assert (run / "adapter" / "adapter_config.json").is_file()
        losses.append(metrics_of(run)["valid_loss"])
        row = re.search(rf"│ {i} +│ {lr} +│ [\d.]+ +│ ([\d.]+) +│.*│ ok +│ {run} +│",
                        result.output)
        assert row and float(row.group(1)) == pytest.approx(losses[-1], rel=1e-3), result.output
    assert losses[0] != losses[1]


# -- units: no processes ---------------------------------------------------------------------
def test_split_batch_sampler_slices_the_one_process_batches():
    ds = TensorDataset(torch.arange(21))
    dl = DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))
    whole = [b[0].tolist() for b in dl]
    parts = []
    for rank in (0, 1):
        dl = DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))
        parts.append([b[0].tolist() for b in split_loader(Loader(dl), rank, 2).dl])
    assert [sorted(a + b) for a, b in zip(*parts, strict=True)] == [sorted(b) for b in whole]
    assert len(split_loader(Loader(dl), 0, 2).dl) == 3  # one process's batches: same schedule
    bucket = BucketSampler([3, 1, 4, 1, 5, 9, 2, 6, 5, 3], bs=4, seed=0)
    sliced = [list(SplitBatchSampler(bucket, r, 3)) for r in range(3)]
    # the last batch (2 items) is smaller than 3 processes: skipped by every rank
    assert [len(s) for s in sliced] == [2, 2, 2]
    assert sorted(sum((s[0] for s in sliced), [])) == sorted(next(iter(bucket)))


def test_the_errors_name_the_fix(tiny_overrides):
    with pytest.raises(RecipeConfigError, match="train.strategy=ddp"):
        recipes.compose("lora_finetune", [*tiny_overrides, "train.strategy=fsdp"])
    with pytest.raises(RecipeConfigError, match="must be one of ddp, fsdp"):
        recipes.compose("full_finetune", [*tiny_overrides, "train.strategy=zero3"])
    with pytest.raises(ValueError, match="at least 1"):
        launch("full_finetune", tiny_overrides, nproc=0)
    result = CliRunner().invoke(build_app(), ["train", "full_finetune", "--nproc", "2", "-m",
                                              *tiny_overrides, "hydra/sweeper=optuna",
                                              "optimizer.lr=interval(1e-3,1e-2)"])
    assert result.exit_code != 0 and "drop --nproc" in result.output
    with pytest.raises(ValueError, match="at least 1"):
        recipes.sweep("full_finetune", [*tiny_overrides, "optimizer.lr=1e-3,1e-2"], nproc=0)
    cmd = command("full_finetune", ["epochs=2"], "conf", nproc=4)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                       "-m", "mlx_train.runner.launch", "full_finetune", "--config-dir", "conf",
                       "epochs=2"]
    assert os.environ.get("WORLD_SIZE") is None
