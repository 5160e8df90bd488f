"""The shipped callbacks: trackers, gradient accumulation and clipping, mixed precision, CSV log,
progress display."""

import csv
import io

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from mlx_train import (
    CSVLogger,
    EarlyStoppingCallback,
    GradientAccumulation,
    GradientClip,
    Metric,
    MixedPrecision,
    ProgressCallback,
    ReduceLROnPlateau,
    SaveModelCallback,
    TerminateOnNaNCallback,
)

from .helpers import MLP, loader_like, make_dls, make_learner


class Scripted(Metric):
    """A metric whose value in epoch i is values[i]."""

    def __init__(self, values, name="score"):
        self.values, self._name, self.i = list(values), name, -1

    def reset(self):
        self.i += 1

    @property
    def value(self):
        return self.values[self.i]

    @property
    def name(self):
        return self._name


def test_early_stopping_waits_patience_epochs():
    learn = make_learner(metrics=Scripted([0.5, 0.6, 0.55, 0.58, 0.7, 0.9]))
    learn.fit(6, cbs=EarlyStoppingCallback("score", patience=2))
    assert len(learn.recorder.values) == 4  # best at epoch 1, no gain at 2 and 3 -> stop
    learn = make_learner(metrics=Scripted([0.5, 0.6, 0.55, 0.58, 0.7, 0.9]))
    learn.fit(6, cbs=EarlyStoppingCallback("score", patience=2, min_delta=0.2))
    assert len(learn.recorder.values) == 3  # +0.1 is not enough: no improvement after epoch 0
    with pytest.raises(ValueError, match="cannot monitor 'accuracy'"):
        make_learner().fit(1, cbs=EarlyStoppingCallback("accuracy"))


def test_save_model_keeps_the_best_and_loads_it_back(tmp_path):
    snapshots = []
    learn = make_learner(metrics=Scripted([0.3, 0.8, 0.5, 0.6]), path=tmp_path)
    from mlx_train import Callback

    learn.fit(4, lr=1e-2, cbs=[SaveModelCallback("score", fname="best"),
                               Callback(after_epoch=lambda: snapshots.append(
                                   {k: v.clone() for k, v in learn.model.state_dict().items()}))])
    assert (tmp_path / "models" / "best.safetensors").exists()
    for k, v in learn.model.state_dict().items():  # weights of epoch 1, the best
        assert torch.equal(v, snapshots[1][k])
    assert not list((tmp_path / "models").glob(".*tmp*"))  # atomic writes leave no temp files
    learn = make_learner(metrics=Scripted([0.3, 0.8, 0.5, 0.6]), path=tmp_path)
    learn.fit(4, lr=1e-2, cbs=SaveModelCallback("score", fname="best2", with_opt=True))
    assert len(learn.recorder.values) == 4  # loading the best weights keeps the history
    learn = make_learner(path=tmp_path)
    learn.fit(3, cbs=SaveModelCallback(every_epoch=2, fname="ep"))
    assert sorted(p.name for p in (tmp_path / "models").glob("ep_*")) == [
        "ep_0.safetensors", "ep_2.safetensors"]


def test_reduce_lr_on_plateau():
    learn = make_learner(metrics=Scripted([0.5, 0.4, 0.4, 0.6, 0.5, 0.5]), lr=1e-2)
    lrs = []
    from mlx_train import Callback

    record = Callback(after_epoch=lambda: lrs.append(learn.opt.hypers[-1]["lr"]))
    record.order = 100  # after the tracker
    learn.fit(6, cbs=[ReduceLROnPlateau("score", patience=2, factor=10, min_lr=5e-4), record])
    assert lrs == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3, 1e-3, 5e-4])  # floored at min_lr


def test_gradient_accumulation_equals_bigger_batches():
    torch.manual_seed(0)
    ours, ref = MLP(), MLP()
    ref.load_state_dict(ours.state_dict())
    dls = make_dls(bs=4, seed=0)
    learn = make_learner(ours, dls, lr=1e-2, wd=0.0)
    learn.fit(1, cbs=GradientAccumulation(n_acc=16))
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    for i, (xb, yb) in enumerate(loader_like(dls, 0)):
        (F.cross_entropy(ref(xb), yb) * 4 / 16).backward()
        if (i + 1) % 4 == 0:
            opt.step()
            opt.zero_grad()
    for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)
    assert len(learn.recorder.raw_losses) == 24 and learn.opt.state  # 24 batches, 6 steps
    assert {int(s["step"]) for s in learn.opt.state.values()} == {6}


def test_gradient_clip_equals_clip_grad_norm():
    torch.manual_seed(0)
    ours, ref = MLP(), MLP()
    ref.load_state_dict(ours.state_dict())
    dls = make_dls(bs=16, seed=0)
    learn = make_learner(ours, dls, lr=1e-2, wd=0.0)
    clip = GradientClip(max_norm=0.05)
    learn.fit(1, cbs=clip)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    norms = []
    for xb, yb in loader_like(dls, 0):
        F.cross_entropy(ref(xb), yb).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05))
        opt.step()
        opt.zero_grad()
    assert min(norms) > 0.05  # the clip was active
    for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)


def test_mixed_precision_bf16_on_cpu_trains_close_to_fp32():
    torch.manual_seed(0)
    fp32, bf16 = MLP(), MLP()
    bf16.load_state_dict(fp32.state_dict())
    preds = []
    from mlx_train import Callback

    a = make_learner(fp32, make_dls(seed=0), lr=1e-2)
    a.fit(2)
    b = make_learner(bf16, make_dls(seed=0), lr=1e-2)
    b.fit(2, cbs=[MixedPrecision(), Callback(after_loss=lambda: preds.append(b.pred.dtype))])
    assert set(preds) == {torch.float32}  # predictions are cast back for the loss
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    assert b.recorder.values[-1][1] == pytest.approx(a.recorder.values[-1][1], abs=0.05)
    assert not torch.is_autocast_enabled("cpu")  # autocast is closed after the fit


def test_mixed_precision_fp16_scaler_skips_overflowing_steps():
    from mlx_train import Callback

    torch.manual_seed(0)
    learn = make_learner(dls=make_dls(bs=48, seed=0), lr=1e-2)
    before = [p.detach().clone() for p in learn.model.parameters()]
    mp = MixedPrecision(torch.float16)

    def poison():
        if learn.train_iter == 0:
            learn.model.head.weight.grad[0, 0] = float("inf")

    learn.fit(1, cbs=[mp, Callback(after_backward=poison)])
    assert learn.recorder.raw_losses and len(mp.scales) == 1  # first step skipped, second taken
    assert mp.scales[0] == 65536.0 / 2  # the scaler backed off after the overflow
    assert not all(torch.equal(a, p) for a, p in zip(before, learn.model.parameters(), strict=True))
    with pytest.raises(ValueError, match="float16 or torch.bfloat16"):
        MixedPrecision(torch.float64)


def test_terminate_on_nan():
    from mlx_train import Callback

    learn = make_learner()

    def nan_loss():
        if learn.training and learn.train_iter == 1:
            learn.loss = torch.tensor(float("nan"))

    learn.fit(3, cbs=[TerminateOnNaNCallback(), Callback(after_loss=nan_loss)])
    assert learn.train_iter == 2 and learn.recorder.values == []


def test_csv_logger(tmp_path):
    learn = make_learner(path=tmp_path)
    logger = CSVLogger()
    learn.fit(2, cbs=logger)
    rows = list(csv.reader((tmp_path / "history.csv").open()))
    assert rows[0] == ["epoch", "train_loss", "valid_loss", "time"]
    assert [r[0] for r in rows[1:]] == ["0", "1"]
    assert float(rows[2][2]) == pytest.approx(learn.recorder.values[1][1])
    learn.fit(1, cbs=CSVLogger(append=True))
    assert len(list(csv.reader((tmp_path / "history.csv").open()))) == 4  # header once


def test_progress_bars_table_and_switches(capsys):
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    learn = make_learner(progress=True)
    learn.remove_cb(ProgressCallback).add_cb(ProgressCallback(console=console))
    seen = []
    from mlx_train import Callback

    learn.fit(1, cbs=Callback(after_batch=lambda: seen.append(learn.progress.progress is not None)))
    text = out.getvalue()
    assert all(seen) and "epoch" in text and "train_loss" in text and "loss " in text
    assert learn.progress.progress is None  # stopped
    out.truncate(0)
    with learn.no_bar():
        seen.clear()
        learn.fit(1, cbs=Callback(after_batch=lambda: seen.append(learn.progress.progress)))
    assert seen and all(s is None for s in seen) and "train_loss" in out.getvalue()
    out.truncate(0)
    out.seek(0)
    with learn.no_logging(), learn.no_bar():
        learn.fit(1)
    assert out.getvalue().strip() == ""
    capsys.readouterr()
    make_learner().fit(1)  # the default console is stdout; not a terminal here: rows only
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == ["epoch", "train_loss", "valid_loss", "time"]
