"""Sweeps that scale out: ``--jobs N`` (N jobs at a time in worker processes), Hydra's launcher
plugins (submitit's local executor stands in for Slurm: the same code path), and the results
table and plot every sweep leaves."""

import csv
import json

import pytest
from typer.testing import CliRunner

from mlx_core.cli.app import build_app
from mlx_train import recipes
from mlx_train.recipes import RecipeConfigError
from mlx_train.runner.parallel import threads_per_job

FAST = ["epochs=1", "eval.exact_match=false", "logger=none", "save.checkpoint_every=0"]


def _metrics(out, n):
    return [json.loads((out / str(i) / "metrics.json").read_text()) for i in range(n)]


@pytest.mark.slow
def test_jobs_2_gives_each_job_the_metrics_of_one_after_another(tiny_overrides, tmp_path):
    one = recipes.sweep("lora_finetune", [*tiny_overrides, *FAST, f"output_dir={tmp_path / 'one'}",
                                          "optimizer.lr=1e-2,3e-2"])
    two = recipes.sweep("lora_finetune", [*tiny_overrides, *FAST, f"output_dir={tmp_path / 'two'}",
                                          "optimizer.lr=1e-2,3e-2"], jobs=2)
    assert [j.swept for j in two] == [j.swept for j in one]
    assert [j.output_dir for j in two] == [str(tmp_path / "two" / str(i)) for i in range(2)]
    assert not any(j.error for j in two)
    for a, b in zip(one, two, strict=True):  # 2 threads vs 1 each: float sums may reorder
        for key in ("train_loss", "valid_loss", "perplexity"):
            assert b.metrics[key] == pytest.approx(a.metrics[key], rel=1e-5, abs=1e-6), key
    assert _metrics(tmp_path / "two", 2) == [j.metrics for j in two]
    assert "valid_loss" in (tmp_path / "two" / "0" / "job.log").read_text()  # its output
    with open(tmp_path / "two" / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["optimizer.lr"] for r in rows] == ["0.01", "0.03"]
    assert [float(r["valid_loss"]) for r in rows] == [j.metrics["valid_loss"] for j in two]
    assert (tmp_path / "two" / "sweep.png").stat().st_size > 1000


def test_a_failing_job_is_recorded_and_the_others_run(tiny_overrides, tmp_path):
    out = tmp_path / "sweep"
    (out / "0").mkdir(parents=True)
    (out / "0" / "metrics.json").write_text("{}")  # job 0's directory already holds a run
    jobs = recipes.sweep("lora_finetune", [*tiny_overrides, *FAST, f"output_dir={out}",
                                           "optimizer.lr=1e-2,3e-2"], jobs=2)
    assert "FileExistsError" in jobs[0].error and "already holds a run" in jobs[0].error
    assert not jobs[1].error and jobs[1].metrics["valid_loss"] > 0
    assert "Traceback" in (out / "0" / "job.log").read_text()


def test_threads_are_shared_out():
    assert threads_per_job(2, cpus=2) == 1 and threads_per_job(2, cpus=16) == 8
    assert threads_per_job(4, cpus=2) == 1


def test_bad_jobs_and_launcher_options_name_the_fix(tiny_overrides):
    with pytest.raises(ValueError, match="--jobs must be at least 1"):
        recipes.sweep("lora_finetune", [*tiny_overrides, "optimizer.lr=1e-2,3e-2"], jobs=0)
    with pytest.raises(ValueError, match="choose one"):
        recipes.sweep("lora_finetune", [*tiny_overrides, "optimizer.lr=1e-2,3e-2"], jobs=2,
                      nproc=2)
    with pytest.raises(RecipeConfigError, match="only with a launcher"):
        recipes.sweep("lora_finetune", [*tiny_overrides, "optimizer.lr=1e-2,3e-2",
                                        "hydra.launcher.n_jobs=2"])
    with pytest.raises(RecipeConfigError, match="(?s)hydra/launcher=nosuch.*submitit_local.*plugin installed"):
        recipes.sweep("lora_finetune", [*tiny_overrides, "optimizer.lr=1e-2,3e-2",
                                        "hydra/launcher=nosuch"])
    result = CliRunner().invoke(build_app(), ["train", "lora_finetune", *tiny_overrides,
                                              "--jobs", "2"])
    assert result.exit_code != 0 and "add -m" in result.output


@pytest.mark.slow
def test_the_submitit_local_launcher_runs_a_two_job_sweep(tiny_overrides, tmp_path):
    # through the Python API: submitit binds its log handlers to sys.stdout/stderr when first
    # imported, and CliRunner's streams are closed after each invoke
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    out = tmp_path / "slurm-like"
    jobs = recipes.sweep("lora_finetune", [*tiny_overrides, *FAST, f"output_dir={out}",
                                           "optimizer.lr=1e-2,3e-2", "hydra/launcher=submitit_local",
                                           "hydra.launcher.timeout_min=10"])
    assert not any(j.error for j in jobs), [j.error for j in jobs]
    metrics = _metrics(out, 2)
    assert [j.metrics for j in jobs] == metrics
    assert all(m["valid_loss"] > 0 and m["epochs"] == 1 for m in metrics)
    for i, lr in enumerate(("0.01", "0.03")):
        assert (out / str(i) / ".hydra" / "overrides.yaml").is_file()  # Hydra's run_job ran it
        assert f"lr: {lr}" in (out / str(i) / "config.yaml").read_text()
    assert (out / ".submitit").is_dir() and (out / "sweep.png").is_file()


@pytest.mark.slow
def test_the_sweep_bench_runs_and_compares_the_jobs(tmp_path):
    from mlx_train.bench_sweep import run

    result = run(n_jobs_in_sweep=2, jobs=2, epochs=1, sentences=40, directory=str(tmp_path))
    assert result["sequential_s"] > 0 and result["parallel_s"] > 0 and result["ratio"] > 0
    assert result["max_relative_metric_difference"] < 1e-5
