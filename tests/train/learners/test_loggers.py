"""TensorBoard, MLflow and W&B logger callbacks: event files read back, the logging calls made
(with stand-in modules for packages that are not installed) and the install hint when missing."""

import sys
import types

import pytest
import torch

from mlx_train.callback.loggers import MLflowCallback, TensorBoardCallback, WandbCallback

from ..helpers import make_learner, two_groups


def test_tensorboard_writes_event_files_with_the_recorders_values(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    learn = make_learner(path=tmp_path, splitter=two_groups)
    tb = TensorBoardCallback("tb")
    with learn.no_logging():
        learn.fit(2, lr=slice(1e-3, 1e-2), cbs=tb)
    files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert files and tb.writer is None  # closed after the fit
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr_0", "train/lr_1", "epoch/train_loss", "epoch/valid_loss"} <= tags
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, 13))  # 6 batches per epoch, step = batches done
    assert [e.value for e in losses] == pytest.approx(learn.recorder.raw_losses, rel=1e-6)
    assert [e.value for e in events.Scalars("train/lr_0")] == pytest.approx([1e-3] * 12)
    valid = [e.value for e in events.Scalars("epoch/valid_loss")]
    assert valid == pytest.approx([row[1] for row in learn.recorder.values], rel=1e-6)
    assert "hyperparameters/text_summary" in events.Tags()["tensors"]


@pytest.mark.parametrize(("cls", "module", "pip"), [
    (TensorBoardCallback, "torch.utils.tensorboard", "tensorboard"),
    (MLflowCallback, "mlflow", "mlflow"),
    (WandbCallback, "wandb", "wandb"),
])
def test_missing_package_names_the_pip_install(monkeypatch, cls, module, pip):
    monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    with pytest.raises(ImportError, match=rf"{cls.__name__} needs the '{pip}' package.*"
                                          rf"pip install {pip}"):
        cls()


def _fake_mlflow():
    calls = []
    mod = types.ModuleType("mlflow")
    state = {"run": None}
    mod.set_tracking_uri = lambda uri: calls.append(("uri", uri))
    mod.set_experiment = lambda name: calls.append(("experiment", name))
    mod.active_run = lambda: state["run"]

    def start_run(run_name=None):
        state["run"] = run_name or "run"
        calls.append(("start", run_name))

    def end_run():
        state["run"] = None
        calls.append(("end",))

    mod.start_run, mod.end_run = start_run, end_run
    mod.log_params = lambda params: calls.append(("params", params))
    mod.log_metrics = lambda metrics, step: calls.append(("metrics", metrics, step))
    return mod, calls


def test_mlflow_calls(monkeypatch, tmp_path):
    mod, calls = _fake_mlflow()
    monkeypatch.setitem(sys.modules, "mlflow", mod)
    torch.manual_seed(0)
    learn = make_learner(path=tmp_path)
    with learn.no_logging():
        learn.fit(2, lr=1e-3, cbs=MLflowCallback("exp", run_name="r1", tracking_uri="file:x",
                                                 log_every=2, params={"note": "hi"}))
    assert calls[:3] == [("uri", "file:x"), ("experiment", "exp"), ("start", "r1")]
    params = calls[3][1]
    assert params["note"] == "hi" and params["n_epoch"] == 2 and params["lr_0"] == 1e-3
    batch = [c for c in calls if c[0] == "metrics" and "train/loss" in c[1]]
    assert [c[2] for c in batch] == [2, 4, 6, 8, 10, 12]  # every 2nd batch
    assert [c[1]["train/loss"] for c in batch] == pytest.approx(learn.recorder.raw_losses[1::2])
    epochs = [c for c in calls if c[0] == "metrics" and "epoch/valid_loss" in c[1]]
    assert [(c[2], c[1]["epoch/valid_loss"]) for c in epochs] == \
        [(i, pytest.approx(row[1])) for i, row in enumerate(learn.recorder.values)]
    assert calls[-1] == ("end",)
    # inside an active run: logs into it and leaves it open
    calls.clear()
    mod.start_run("outer")
    with learn.no_logging():
        learn.fit(1, lr=1e-3, cbs=MLflowCallback())
    assert ("end",) not in calls and mod.active_run() == "outer"


def test_wandb_calls(monkeypatch, tmp_path):
    calls = []
    mod = types.ModuleType("wandb")
    mod.run = None

    def init(**kwargs):
        mod.run = "run"
        calls.append(("init", kwargs))

    def finish():
        mod.run = None
        calls.append(("finish",))

    mod.init, mod.finish = init, finish
    mod.log = lambda values, step: calls.append(("log", values, step))
    monkeypatch.setitem(sys.modules, "wandb", mod)
    torch.manual_seed(0)
    learn = make_learner(path=tmp_path)
    with learn.no_logging():
        learn.fit(1, lr=1e-3, cbs=WandbCallback(project="p", name="n", mode="offline",
                                                config={"extra": 1}))
    kind, kwargs = calls[0]
    assert kind == "init" and kwargs["project"] == "p" and kwargs["mode"] == "offline"
    assert kwargs["config"]["extra"] == 1 and kwargs["config"]["model"] == "MLP"
    logs = [c for c in calls if c[0] == "log"]
    assert [c[2] for c in logs] == [1, 2, 3, 4, 5, 6, 6]  # six batches, then the epoch row
    assert logs[-1][1]["epoch"] == 0 and logs[-1][1]["epoch/valid_loss"] == \
        pytest.approx(learn.recorder.values[0][1])
    assert calls[-1] == ("finish",)


def test_log_every_is_checked():
    with pytest.raises(ValueError, match="log_every must be at least 1"):
        TensorBoardCallback(log_every=0)
