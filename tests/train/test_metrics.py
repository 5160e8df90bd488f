"""Metrics against hand computations, accumulated over uneven validation batches."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mlx_train import (
    RMSE,
    AvgMetric,
    DataLoaders,
    F1Score,
    Learner,
    Perplexity,
    R2Score,
    accuracy,
    error_rate,
    mae,
    r2_score,
    rmse,
    top_k_accuracy,
)
from mlx_train.metrics import mk_metric

from .helpers import MLP, classification_data, regression_data

PREDS = torch.tensor([0, 1, 2, 2, 1, 0, 0, 2, 1, 1])
TARGS = torch.tensor([0, 1, 1, 2, 1, 2, 0, 2, 0, 1])


def _f1_by_hand(c):
    tp = sum(int(p == c and t == c) for p, t in zip(PREDS, TARGS, strict=True))
    fp = sum(int(p == c and t != c) for p, t in zip(PREDS, TARGS, strict=True))
    fn = sum(int(p != c and t == c) for p, t in zip(PREDS, TARGS, strict=True))
    return tp, fp, fn


def test_f1_averages_by_hand():
    counts = [_f1_by_hand(c) for c in range(3)]
    per_class = [2 * tp / (2 * tp + fp + fn) for tp, fp, fn in counts]
    support = [int((TARGS == c).sum()) for c in range(3)]
    tp, fp, fn = (sum(c[i] for c in counts) for i in range(3))
    logits = nn.functional.one_hot(PREDS, 3).float()
    for average, expect in [("macro", sum(per_class) / 3), ("micro", 2 * tp / (2 * tp + fp + fn)),
                            ("weighted", sum(f * s for f, s in zip(per_class, support, strict=True)) / 10),
                            ("binary", per_class[1])]:
        m = F1Score(average)
        m.reset()
        for sl in (slice(0, 3), slice(3, 10)):  # two uneven batches
            m.accumulate(_Fake(logits[sl], TARGS[sl]))
        assert m.value == pytest.approx(expect), average
    with pytest.raises(ValueError, match="macro, micro, weighted or binary"):
        F1Score("samples")


class _Fake:
    def __init__(self, pred, targ, loss=None):
        self.pred, self.yb, self.loss = pred, (targ,), loss


def test_classification_functions():
    logits = torch.tensor([[2.0, 1.0, 0.1], [0.1, 0.2, 3.0], [1.0, 3.0, 2.0], [0.5, 0.4, 0.3]])
    targ = torch.tensor([0, 0, 2, 0])
    assert accuracy(logits, targ).item() == pytest.approx(0.5)
    assert error_rate(logits, targ).item() == pytest.approx(0.5)
    assert top_k_accuracy(logits, targ, k=2).item() == pytest.approx(3 / 4)
    assert top_k_accuracy(logits, targ, k=3).item() == 1.0
    with pytest.raises(ValueError, match="4 predictions but 3 targets"):
        accuracy(logits, targ[:3])


def test_regression_metrics_over_an_epoch_equal_whole_set_values():
    torch.manual_seed(0)
    pred, targ = torch.randn(23, 1), torch.randn(23, 1)
    err = (pred - targ).flatten().double()
    by_hand = {"rmse": math.sqrt((err**2).mean()), "mae": float(err.abs().mean()),
               "r2_score": float(1 - (err**2).sum() / ((targ.double() - targ.double().mean()) ** 2).sum())}
    metrics = [mk_metric(m) for m in (rmse, mae, r2_score)]
    for m in metrics:
        m.reset()
        for sl in (slice(0, 5), slice(5, 16), slice(16, 23)):
            m.accumulate(_Fake(pred[sl], targ[sl]))
    got = {m.name: float(m.value) for m in metrics}
    assert got == pytest.approx(by_hand, rel=1e-6)
    assert isinstance(mk_metric(RMSE), RMSE) and isinstance(mk_metric(R2Score()), R2Score)


def test_perplexity_is_exp_of_the_size_weighted_mean_loss():
    m = Perplexity()
    m.reset()
    m.accumulate(_Fake(None, torch.zeros(2), torch.tensor(1.0)))
    m.accumulate(_Fake(None, torch.zeros(6), torch.tensor(2.0)))
    assert m.value == pytest.approx(math.exp((2 * 1 + 6 * 2) / 8))
    assert m.name == "perplexity"


def test_learner_metrics_over_uneven_batches_match_a_manual_pass():
    torch.manual_seed(0)
    train, valid = classification_data(64), classification_data(37, seed=3)
    dls = DataLoaders.from_dsets(train, valid, bs=10)  # valid batches: 10, 10, 10, 7
    learn = Learner(dls, MLP(), nn.CrossEntropyLoss(), progress=False,
                    metrics=[accuracy, F1Score("macro"), AvgMetric(error_rate, name="err")])
    learn.fit(1, lr=1e-2)
    assert learn.recorder.metric_names == ["epoch", "train_loss", "valid_loss", "accuracy",
                                           "f1_macro", "err", "time"]
    x, y = valid.tensors
    learn.model.eval()
    with torch.no_grad():
        logits = learn.model(x)
    preds = logits.argmax(-1)
    f1s = []
    for c in sorted(set(preds.tolist()) | set(y.tolist())):
        tp, fp, fn = (int(((preds == c) & (y == c)).sum()), int(((preds == c) & (y != c)).sum()),
                      int(((preds != c) & (y == c)).sum()))
        f1s.append(2 * tp / (2 * tp + fp + fn))
    loss, acc, f1, err = learn.recorder.values[-1][1:]
    assert loss == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert acc == pytest.approx((preds == y).float().mean().item())
    assert f1 == pytest.approx(sum(f1s) / len(f1s))
    assert err == pytest.approx(1 - acc)


def test_regression_learner_with_rmse_and_r2():
    train, valid = regression_data(64), regression_data(30, seed=1)
    dls = DataLoaders(DataLoader(train, batch_size=16, shuffle=True), DataLoader(valid, batch_size=8))
    learn = Learner(dls, nn.Linear(4, 1), nn.MSELoss(), metrics=[rmse, r2_score, mae], progress=False)
    learn.fit(2, lr=5e-2)
    x, y = valid.tensors
    with torch.no_grad():
        err = (learn.model(x) - y).flatten().double()
    r, r2, a = learn.recorder.values[-1][2:]
    assert r == pytest.approx(math.sqrt((err**2).mean()), rel=1e-5)
    assert r2 == pytest.approx(float(1 - (err**2).sum() / ((y - y.mean()) ** 2).sum()), rel=1e-5)
    assert a == pytest.approx(float(err.abs().mean()), rel=1e-5)
    assert learn.validate()[1] == pytest.approx(r, rel=1e-6)
    preds, targs = learn.get_preds()
    assert preds.shape == (30, 1) and torch.equal(targs, y)


def test_train_metrics_columns():
    from mlx_train import Recorder

    dls = DataLoaders.from_dsets(classification_data(32), classification_data(16, seed=1), bs=8)
    learn = Learner(dls, MLP(), nn.CrossEntropyLoss(), metrics=accuracy, progress=False)
    learn.remove_cb(Recorder).add_cb(Recorder(train_metrics=True, add_time=False))
    learn.fit(1)
    assert learn.recorder.metric_names == ["epoch", "train_loss", "train_accuracy", "valid_loss",
                                           "valid_accuracy"]
    assert all(v is not None for v in learn.recorder.values[0])


def test_not_a_metric():
    with pytest.raises(TypeError, match="not a metric"):
        mk_metric(3)
    assert TensorDataset  # imported for the regression helpers
