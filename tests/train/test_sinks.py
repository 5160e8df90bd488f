"""The one logging pipeline (``mlx_train.sinks``): each sink with its real library (CSV files,
TensorBoard's event files, a local MLflow store, an offline W&B run, the rich console), read
back; and the Learner, a recipe and the JAX loop sending rows of one schema through one sink."""

import io
import re

import pytest
import torch
from rich.console import Console

from mlx_train import Perplexity, recipes
from mlx_train.callback.loggers import CSVLogger, MetricsCSVLogger
from mlx_train.callback.train_metrics import TrainMetrics
from mlx_train.sinks import (
    ConsoleSink,
    CSVSink,
    MissingPackage,
    MLflowSink,
    Sink,
    Sinks,
    TensorBoardSink,
    WandbSink,
)
from mlx_train.sinks.csv_file import read_csv

from .helpers import make_learner
from .trackers import mlflow_history, mlflow_runs, wandb_runs

HPARAMS = {"n_epoch": 2, "model": "MLP", "lr_0": 1e-3}
STEPS = [(1, 0, {"train/loss": 2.5, "train/lr": 1e-3}), (2, 0, {"train/loss": 2.0, "train/lr": 2e-3}),
         (3, 1, {"train/loss": 1.5, "train/lr": 1e-3})]
EPOCHS = [(0, {"train_loss": 2.2, "valid_loss": 2.1, "accuracy": 0.5, "time": "00:01"}, 2),
          (1, {"train_loss": 1.6, "valid_loss": None, "accuracy": None, "time": "00:02"}, 3)]


def feed(sink, directory, steps=STEPS, epochs=EPOCHS) -> None:
    """A run of two epochs: the step rows, each epoch's row after its steps."""
    sink.open(directory, HPARAMS)
    for epoch, row, step in epochs:
        for s in steps:
            if s[1] == epoch:
                sink.log_step(*s)
        sink.log_epoch(epoch, row, step)
    sink.close()
    sink.close()  # twice is fine


def test_every_sink_is_a_sink():
    pytest.importorskip("tensorboard")
    for sink in (CSVSink(), TensorBoardSink(), ConsoleSink(), Sinks()):
        assert isinstance(sink, Sink), type(sink).__name__


def test_csv_sink_writes_the_step_and_epoch_files(tmp_path):
    sink = CSVSink()
    feed(sink, tmp_path)
    steps = (tmp_path / "train_metrics.csv").read_text().splitlines()
    assert steps == ["step,epoch,loss,lr", "1,0,2.5,0.001", "2,0,2.0,0.002", "3,1,1.5,0.001"]
    history = (tmp_path / "history.csv").read_text().splitlines()
    assert history == ["epoch,train_loss,valid_loss,accuracy,time", "0,2.2,2.1,0.5,00:01",
                       "1,1.6,,,00:02"]  # a phase that did not run: empty cells
    assert sink.where(tmp_path) == [f"step metrics: {tmp_path / 'train_metrics.csv'}",
                                    f"epoch table: {tmp_path / 'history.csv'}"]
    # appending (a resumed run): one header, and a new column is left out
    feed(sink, tmp_path, steps=[(4, 2, {"train/loss": 1.0, "train/lr": 0.0, "train/x": 1.0})],
         epochs=[(2, {"train_loss": 1.1, "valid_loss": 1.0, "accuracy": 0.9, "time": "00:01"}, 4)])
    assert read_csv(tmp_path / "train_metrics.csv")[-1] == \
        {"step": "4", "epoch": "2", "loss": "1.0", "lr": "0.0"}
    assert len(read_csv(tmp_path / "history.csv")) == 3
    # not appending: written anew; a file set to None is not written
    CSVSink(steps=None, epochs="epochs.csv", append=False).open(tmp_path, {})
    assert not (tmp_path / "None").exists()
    feed(CSVSink(steps=tmp_path / "abs.csv", epochs=None, append=False), tmp_path / "elsewhere")
    assert len(read_csv(tmp_path / "abs.csv")) == 3  # an absolute path stays where it is


def test_tensorboard_sink_read_back_with_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink("tb")
    feed(sink, tmp_path)
    assert sink.writer is None
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = {tag: [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag)]
               for tag in events.Tags()["scalars"]}
    assert scalars == {
        "train/loss": [(1, 2.5), (2, 2.0), (3, 1.5)], "train/lr": [(1, 1e-3), (2, 2e-3), (3, 1e-3)],
        "epoch/train_loss": [(0, 2.2), (1, 1.6)], "epoch/valid_loss": [(0, 2.1)],
        "epoch/accuracy": [(0, 0.5)]}  # the epoch rows at step = epoch; no time, no empty cells
    assert "hyperparameters/text_summary" in events.Tags()["tensors"]
    assert sink.where(tmp_path) == [f"TensorBoard: tensorboard --logdir {tmp_path / 'tb'}"]


def test_mlflow_sink_read_back_with_mlflows_client(mlflow_uri, tmp_path):
    sink = MLflowSink("sinks", run_name="r", tracking_uri=mlflow_uri, params={"note": "hi"})
    feed(sink, tmp_path)
    (run,) = mlflow_runs(mlflow_uri, "sinks")
    assert run.info.run_id == sink.run_id and run.info.status == "FINISHED"
    assert run.data.params == {"n_epoch": "2", "model": "MLP", "lr_0": "0.001", "note": "hi"}
    assert mlflow_history(mlflow_uri, run.info.run_id, "train/loss") == \
        [(1, 2.5), (2, 2.0), (3, 1.5)]
    assert mlflow_history(mlflow_uri, run.info.run_id, "epoch/train_loss") == [(0, 2.2), (1, 1.6)]
    assert set(run.data.metrics) == {"train/loss", "train/lr", "epoch/train_loss",
                                     "epoch/valid_loss", "epoch/accuracy"}
    assert sink.where(tmp_path) == ["MLflow: experiment sinks"]


def test_wandb_sink_read_back_from_the_offline_run(wandb_offline, tmp_path):
    sink = WandbSink(project="sinks", name="r", config={"note": "hi"})
    feed(sink, tmp_path)
    (run,) = wandb_runs(wandb_offline)
    assert (run["project"], run["name"], run["finished"]) == ("sinks", "r", True)
    assert {k: run["config"][k] for k in (*HPARAMS, "note")} == {**HPARAMS, "note": "hi"}
    rows = [{k: v for k, v in row.items() if not k.startswith("_") or k == "_step"}
            for row in run["history"]]
    assert rows == [  # every row at step = batches done; an epoch row joins its last step's
        {"_step": 1, "train/loss": 2.5, "train/lr": 1e-3},
        {"_step": 2, "train/loss": 2.0, "train/lr": 2e-3, "epoch/train_loss": 2.2,
         "epoch/valid_loss": 2.1, "epoch/accuracy": 0.5, "epoch": 0},
        {"_step": 3, "train/loss": 1.5, "train/lr": 1e-3, "epoch/train_loss": 1.6, "epoch": 1}]


def test_console_sink_prints_the_epoch_table():
    out = io.StringIO()
    sink = ConsoleSink(Console(file=out, width=200))
    feed(sink, None)
    assert out.getvalue().splitlines() == [
        "epoch      train_loss  valid_loss  accuracy   time",
        "0          2.200000    2.100000    0.500000   00:01",
        "1          1.600000    None        None       00:02"]
    out.truncate(0)
    out.seek(0)
    feed(ConsoleSink(Console(file=out, width=200), steps=True), None, epochs=EPOCHS[:1])
    assert out.getvalue().splitlines()[0] == "step 1  epoch 0  loss 2.500000  lr 0.001000"


def test_sinks_fan_out_and_close_every_sink():
    class Broken(ConsoleSink):
        def close(self):
            raise OSError("disk gone")

    out = io.StringIO()
    last = ConsoleSink(Console(file=out, width=200))
    sinks = Sinks([Broken(Console(file=io.StringIO())), last])
    sinks.open(".", {})
    sinks.log_epoch(0, {"train_loss": 1.0}, 3)
    assert "1.000000" in out.getvalue()
    last.widths = [1]
    with pytest.raises(OSError, match="disk gone"):
        sinks.close()
    assert last.widths is None  # closed although the first one failed


def test_a_missing_package_names_the_sink_and_the_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "mlflow", None)
    with pytest.raises(MissingPackage, match="MLflowSink needs the 'mlflow' package.*"
                                             "pip install mlflow"):
        MLflowSink()


# -- one row schema, whoever trains -----------------------------------------------------------
def record_csv_rows(monkeypatch) -> list[tuple]:
    """Every row any ``CSVSink`` receives: (kind, the call's arguments)."""
    calls = []
    for name in ("log_step", "log_epoch"):
        original = getattr(CSVSink, name)

        def record(self, *args, _name=name, _original=original):
            calls.append((_name, *args))
            return _original(self, *args)

        monkeypatch.setattr(CSVSink, name, record)
    return calls


def schema(calls) -> dict:
    """The rows' shape: per kind, the columns and each one's type; every row alike."""
    shapes = {}
    for kind, *args in calls:
        if kind == "log_step":
            step, epoch, values = args
            shape = (type(step), type(epoch), tuple((k, type(v)) for k, v in values.items()))
        else:
            epoch, row, step = args
            assert re.fullmatch(r"\d\d:\d\d", row["time"]), row
            shape = (type(epoch), type(step), tuple((k, type(v)) for k, v in row.items()))
        assert shapes.setdefault(kind, shape) == shape, (kind, args)
    return shapes


def test_learner_recipe_and_jax_loop_send_one_row_schema(tmp_path, monkeypatch):
    pytest.importorskip("mlx_jax", reason="the JAX loop needs mlx-jax")
    calls = record_csv_rows(monkeypatch)
    torch.manual_seed(0)
    learn = make_learner(path=tmp_path / "learner", metrics=Perplexity())
    with learn.no_logging():
        learn.fit(2, lr=1e-3, cbs=[TrainMetrics(2), MetricsCSVLogger(), CSVLogger()])
    learner = schema(calls)
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
    shapes = {}
    for backend in ("torch", "jax"):
        calls.clear()
        recipes.run("pretrain", [f"data.path={texts}", "data.seq_len=32", "data.vocab_size=300",
                                 "epochs=2", "train.progress=false", "logger.log_every=1",
                                 "logger.tensorboard=false", f"backend={backend}",
                                 "save.checkpoint_every=0", f"output_dir={tmp_path / backend}"])
        shapes[backend] = schema(calls)
        assert [c[0] for c in calls].count("log_epoch") == 4  # 2 epochs x 2 CSV sinks
    assert shapes["jax"] == shapes["torch"]  # the same columns, in order, of the same types
    step_columns = [k for k, _ in shapes["torch"]["log_step"][2]]
    assert step_columns == ["train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
                            "train/peak_mem_mib"]
    # the Learner's: the same, but items for its table batches, not tokens
    assert learner["log_step"][2] == tuple(
        (k.replace("tokens", "items"), t) for k, t in shapes["torch"]["log_step"][2])
    assert learner["log_epoch"] == shapes["torch"]["log_epoch"]
    assert [k for k, _ in learner["log_epoch"][2]] == ["train_loss", "valid_loss", "perplexity",
                                                       "time"]
