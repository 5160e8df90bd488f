"""Training-metric logging (``TrainMetrics`` and ``logger=default``): the values, the CSV and
TensorBoard files they reach (read back with TensorBoard's own reader), and the recipes' runs."""

import csv
import json
import sys

import pytest
import torch

from mlx_train import GradientAccumulation, GradientClip, TensorBoardCallback, recipes
from mlx_train.callback import train_metrics
from mlx_train.callback.loggers import MetricsCSVLogger
from mlx_train.callback.train_metrics import (
    TrainMetrics,
    count_tokens,
    peak_memory_mib,
    run_loggers,
)

from ..helpers import make_learner, two_groups

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def scalars(log_dir) -> dict[str, list]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_values_reach_csv_and_tensorboard(tmp_path):
    torch.manual_seed(0)
    learn = make_learner(path=tmp_path, splitter=two_groups)
    cbs = [TrainMetrics(log_every=4), MetricsCSVLogger("steps.csv"), TensorBoardCallback("tb")]
    with learn.no_logging():
        learn.fit(2, lr=slice(1e-3, 1e-2), cbs=cbs)  # 6 batches an epoch: rows at 4, 8, 12
    metrics = cbs[0]
    assert [r["step"] for r in metrics.rows] == [4, 8, 12]
    raw = learn.recorder.raw_losses
    for i, row in enumerate(metrics.rows):  # the mean of the interval's losses, not the last one
        assert row["train/loss"] == pytest.approx(sum(raw[4 * i:4 * i + 4]) / 4, rel=1e-5)
        assert row["train/lr"] == pytest.approx(1e-3) and row["train/lr_1"] == pytest.approx(1e-2)
        assert row["train/grad_norm"] > 0 and row["train/items_per_s"] > 0
        assert "train/tokens_per_s" not in row
        assert row["train/peak_mem_mib"] == pytest.approx(peak_memory_mib(), rel=0.5)
    assert [r["epoch"] for r in metrics.rows] == [0, 1, 1]

    rows = read_csv(tmp_path / "steps.csv")
    assert list(rows[0]) == ["step", "epoch", "loss", "lr", "lr_1", "grad_norm", "items_per_s",
                             "peak_mem_mib"]
    assert [float(r["loss"]) for r in rows] == pytest.approx(
        [r["train/loss"] for r in metrics.rows])

    tags = scalars(tmp_path / "tb")
    for name in ("loss", "lr", "lr_1", "grad_norm", "items_per_s", "peak_mem_mib"):
        assert [e.step for e in tags[f"train/{name}"]] == [4, 8, 12], name
    assert [e.value for e in tags["train/grad_norm"]] == pytest.approx(
        [r["train/grad_norm"] for r in metrics.rows], rel=1e-5)
    assert "train/lr_0" not in tags  # the tracker's own per-batch logging was paused
    assert len(tags["epoch/valid_loss"]) == 2
    assert cbs[2].run_train  # and is back after the fit


def test_grad_norm_is_the_norm_before_clipping_and_computed_once(tmp_path, monkeypatch):
    calls = []
    original = train_metrics.grad_norm
    monkeypatch.setattr(train_metrics, "grad_norm",
                        lambda model: calls.append(1) or original(model))

    def run(log_every, *cbs):
        torch.manual_seed(0)
        learn = make_learner(path=tmp_path)
        metrics = TrainMetrics(log_every=log_every)
        with learn.no_logging():
            learn.fit(1, lr=1e-2, cbs=[metrics, *cbs])
        return metrics.rows

    assert len(run(3)) == 2 and len(calls) == 2  # measured at the logged steps only
    calls.clear()
    plain = run(1)
    calls.clear()
    clipped = run(1, GradientClip(max_norm=1e-3))  # clips hard: the norm read is the one before
    assert calls == []  # GradientClip's own measurement is reused
    # the first step sees the same weights in both runs (clipping changes the later ones)
    assert clipped[0]["train/grad_norm"] == pytest.approx(plain[0]["train/grad_norm"], rel=1e-5)
    assert clipped[0]["train/grad_norm"] > 1e-3 * 10


def test_interval_counts_optimizer_steps_with_gradient_accumulation(tmp_path):
    torch.manual_seed(0)
    learn = make_learner(path=tmp_path)  # bs 16, 6 batches
    metrics = TrainMetrics(log_every=1)
    with learn.no_logging():
        learn.fit(1, lr=1e-2, cbs=[metrics, GradientAccumulation(n_acc=32)])  # 2 batches a step
    assert [r["step"] for r in metrics.rows] == [2, 4, 6]
    raw = learn.recorder.raw_losses
    assert metrics.rows[0]["train/loss"] == pytest.approx((raw[0] + raw[1]) / 2, rel=1e-5)


def test_a_last_short_interval_is_logged_at_the_end(tmp_path):
    learn = make_learner(path=tmp_path)
    metrics = TrainMetrics(log_every=100)
    with learn.no_logging():
        learn.fit(1, lr=1e-2, cbs=metrics)
    assert [r["step"] for r in metrics.rows] == [6]
    assert metrics.rows[0]["train/loss"] == pytest.approx(
        sum(learn.recorder.raw_losses) / 6, rel=1e-5)


def test_count_tokens():
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 0, 0]])
    mask = ids != 0
    labels = torch.tensor([[-100, 6, 7, -100], [-100, -100, -100, -100]])
    assert int(count_tokens((ids, mask), (labels,))) == 5  # the real tokens, from the mask
    assert int(count_tokens((ids,), (labels,))) == 2  # else the labelled ones
    x_cat, x_cont, y = torch.zeros(4, 3, dtype=torch.long), torch.randn(4, 2), torch.zeros(4)
    assert count_tokens((x_cat, x_cont), (y,)) is None  # a table's codes are not tokens
    assert count_tokens((torch.randn(4, 3),), (y,)) is None
    with pytest.raises(ValueError, match="log_every must be at least 1"):
        TrainMetrics(0)


def test_run_loggers_options(monkeypatch):
    for module in ("mlflow", "wandb"):  # as where they are not installed
        monkeypatch.setitem(sys.modules, module, None)
    names = [type(cb).__name__ for cb in run_loggers()]
    assert names == ["TrainMetrics", "MetricsCSVLogger", "CSVLogger", "TensorBoardCallback"]
    assert [type(cb).__name__ for cb in run_loggers(tensorboard=False, history=False)] == \
        ["TrainMetrics", "MetricsCSVLogger"]
    with pytest.raises(ImportError, match="pip install mlflow"):
        run_loggers(mlflow=True)  # not installed; true asks for it, auto would skip it
    assert len(run_loggers(mlflow="auto", wandb="auto")) == 4


def test_recipe_logs_by_default_and_resume_appends(tiny_overrides, tmp_path, capsys):
    overrides = [*tiny_overrides, "optimizer.lr=1e-3",
                 "logger.log_every=1", "eval.exact_match=false"]
    recipes.run("full_finetune", overrides)
    run = tmp_path / "run"
    out = capsys.readouterr().out.replace("\n", "")  # rich wraps long paths
    assert "train_metrics.csv" in out and f"tensorboard --logdir {run / 'tensorboard'}" in out
    rows = read_csv(run / "train_metrics.csv")
    assert len(rows) == 4  # 58 training examples, bs 16: 4 steps, logged every step
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["tokens_per_s"]) > 0 and float(r["grad_norm"]) > 0 for r in rows)
    assert all(float(r["peak_mem_mib"]) > 0 for r in rows)
    tags = scalars(run / "tensorboard")
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
            "train/peak_mem_mib", "epoch/valid_loss"} <= set(tags)
    assert [e.step for e in tags["train/tokens_per_s"]] == [1, 2, 3, 4]
    assert len((run / "history.csv").read_text().splitlines()) == 2

    recipes.run("full_finetune", [*overrides, "epochs=2", "resume=true"])
    rows = read_csv(run / "train_metrics.csv")  # one header, the steps continue
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [int(r["epoch"]) for r in rows] == [0] * 4 + [1] * 4
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2
    tags = scalars(run / "tensorboard")
    assert [e.step for e in tags["train/loss"]] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_logger_none_and_csv_still_work(tiny_overrides, tmp_path):
    recipes.run("full_finetune", [*tiny_overrides, "logger=csv", "eval.exact_match=false"])
    run = tmp_path / "run"
    assert (run / "history.csv").is_file() and not (run / "train_metrics.csv").exists()
    assert not (run / "tensorboard").exists()
