"""TensorBoard, MLflow and W&B logger callbacks, each with its real library (offline / local):
what the run logged, read back (TensorBoard's event files, MLflow's store through its client,
W&B's offline run file), and the install hint when the package is missing."""

import sys

import pytest
import torch

from mlx_train.callback.loggers import MLflowCallback, TensorBoardCallback, WandbCallback

from ..helpers import make_learner, two_groups
from ..trackers import mlflow_history, mlflow_runs, wandb_runs


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


def test_mlflow_logs_a_local_run(mlflow_uri, tmp_path):
    import mlflow

    torch.manual_seed(0)
    learn = make_learner(path=tmp_path)
    with learn.no_logging():
        learn.fit(2, lr=1e-3, cbs=MLflowCallback("exp", run_name="r1", tracking_uri=mlflow_uri,
                                                 log_every=2, params={"note": "hi"}))
    (run,) = mlflow_runs(mlflow_uri, "exp")
    assert run.info.run_name == "r1" and run.info.status == "FINISHED"  # started, then ended
    params = run.data.params  # strings, as MLflow keeps them
    assert params["note"] == "hi" and params["n_epoch"] == "2" and float(params["lr_0"]) == 1e-3
    batch = mlflow_history(mlflow_uri, run.info.run_id, "train/loss")
    assert [step for step, _ in batch] == [2, 4, 6, 8, 10, 12]  # every 2nd batch
    assert [v for _, v in batch] == pytest.approx(learn.recorder.raw_losses[1::2])
    assert mlflow_history(mlflow_uri, run.info.run_id, "epoch/valid_loss") == \
        [(i, pytest.approx(row[1])) for i, row in enumerate(learn.recorder.values)]
    # inside an active run: logs into it and leaves it open
    with mlflow.start_run(run_name="outer") as outer:
        with learn.no_logging():
            learn.fit(1, lr=1e-3, cbs=MLflowCallback())
        assert mlflow.active_run().info.run_id == outer.info.run_id
    assert len(mlflow_history(mlflow_uri, outer.info.run_id, "train/loss")) == 6
    assert len(mlflow_runs(mlflow_uri, "exp")) == 2


def test_wandb_logs_an_offline_run(wandb_offline, tmp_path):
    torch.manual_seed(0)
    learn = make_learner(path=tmp_path)
    with learn.no_logging():
        learn.fit(1, lr=1e-3, cbs=WandbCallback(project="p", name="n", tags=["offline"],
                                                config={"extra": 1}))
    (run,) = wandb_runs(wandb_offline)
    assert (run["project"], run["name"], run["tags"]) == ("p", "n", ["offline"])  # init kwargs
    assert run["config"]["extra"] == 1 and run["config"]["model"] == "MLP"
    assert run["finished"]  # the run it started is finished
    steps = run["history"]
    assert [s["_step"] for s in steps] == [1, 2, 3, 4, 5, 6]  # six batches; the epoch row at 6
    assert [s["train/loss"] for s in steps] == pytest.approx(learn.recorder.raw_losses)
    assert steps[-1]["epoch"] == 0 and steps[-1]["epoch/valid_loss"] == \
        pytest.approx(learn.recorder.values[0][1])


def test_log_every_is_checked():
    with pytest.raises(ValueError, match="log_every must be at least 1"):
        TensorBoardCallback(log_every=0)
