"""mlx bench learner --quick: both sides do the same work (identical final weights) and the
ratio is computed from the bench's own timings."""

import json
import statistics

import pytest

from mlx_train import bench
from mlx_train.cli import bench_learner


def test_quick_bench_ratio_comes_from_its_own_timings():
    result = bench.run(quick=True)
    assert result["n_batches"] == 20 and result["repeats"] == 3
    assert len(result["learner_times_s"]) == len(result["hand_times_s"]) == 3
    assert all(t > 0 for t in result["learner_times_s"] + result["hand_times_s"])
    assert result["learner_s"] == min(result["learner_times_s"])
    assert result["hand_s"] == min(result["hand_times_s"])
    assert result["ratio"] == pytest.approx(result["learner_s"] / result["hand_s"])
    assert result["median_ratio"] == pytest.approx(
        statistics.median(result["learner_times_s"]) / statistics.median(result["hand_times_s"]))
    assert result["overhead_per_batch_us"] == pytest.approx(
        (result["learner_s"] - result["hand_s"]) / 21 * 1e6)
    assert result["max_weight_difference"] == 0.0  # the same work, step for step
    assert 0.2 < result["ratio"] < 5  # sanity only: timings on a shared machine are noisy


def test_bench_command_writes_json(tmp_path):
    typer = pytest.importorskip("typer")
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command("learner")(bench_learner)
    app.command("other")(lambda: None)  # two commands: typer keeps "learner" as a subcommand
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["learner", "--quick", "--batches", "5", "--repeats", "1",
                                   "--width", "16", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "ratio (learner / hand)" in res.output
    data = json.loads(out.read_text())
    assert data["n_batches"] == 5 and data["width"] == 16
    assert data["ratio"] == pytest.approx(data["learner_s"] / data["hand_s"])


def test_registered_as_mlx_bench_learner():
    from mlx_core import registry
    from mlx_core.plugins import load_plugins

    load_plugins()
    assert registry.benchmarks.get("learner") is bench_learner


def test_event_dispatch_cache_follows_the_callback_list():
    from mlx_train import Callback

    from ..helpers import make_learner

    calls = []

    class Late(Callback):
        def after_batch(self):
            calls.append("late")

    class Added(Callback):
        order = -5

        def after_batch(self):
            calls.append("added")
            if "late" not in calls:
                self.learn.add_cb(Late())  # attached mid-fit: dispatched from the next batch

    learn = make_learner()
    with learn.no_logging():
        learn.fit(1, cbs=Added())
    assert calls[:3] == ["added", "added", "late"]
    assert learn.cb("added") is None and [type(c) for c in learn._dispatch("after_batch")
                                          if type(c) is Late]  # fit's cbs gone, Late stays
