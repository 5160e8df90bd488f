"""Metrics that accumulate over a validation epoch (fastai's ``AvgMetric`` / ``AccumMetric`` model).

A metric has ``reset()``, ``accumulate(learn)`` (reads ``learn.pred`` and ``learn.yb`` after
each batch), ``value`` and ``name``. Plain functions ``f(pred, targ)`` passed as ``metrics=``
are wrapped in ``AvgMetric``: the batch-size-weighted mean of per-batch values, which equals the
whole-epoch value for means (accuracy, MAE). Metrics that are not means (RMSE, R², F1) are
``AccumMetric``s: they keep every prediction and compute once at the end of the epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def _bs(yb) -> int:
    first = yb[0] if isinstance(yb, (tuple, list)) else yb
    return first.shape[0] if isinstance(first, torch.Tensor) and first.dim() else 1


class Metric:
    """Blueprint of a metric."""

    def reset(self) -> None:
        pass

    def accumulate(self, learn) -> None:
        pass

    @property
    def value(self):
        raise NotImplementedError

    @property
    def name(self) -> str:
        name = type(self).__name__
        return name[:-6].lower() if name.endswith("Metric") and name != "Metric" else name.lower()


class AvgMetric(Metric):
    """Batch-size-weighted average of ``func(pred, *yb)`` over the epoch."""

    def __init__(self, func: Callable, name: str | None = None):
        self.func, self._name = func, name

    def reset(self) -> None:
        self.total, self.count = 0.0, 0

    def accumulate(self, learn) -> None:
        bs = _bs(learn.yb)
        self.total += float(self.func(learn.pred, *learn.yb)) * bs
        self.count += bs

    @property
    def value(self):
        return self.total / self.count if self.count else None

    @property
    def name(self) -> str:
        if self._name:
            return self._name
        f = getattr(self.func, "func", self.func)  # functools.partial
        return getattr(f, "__name__", type(f).__name__)


class AvgLoss(Metric):
    """Batch-size-weighted mean of the loss (the ``valid_loss`` column)."""

    def reset(self) -> None:
        self.total, self.count = 0.0, 0

    def accumulate(self, learn) -> None:
        bs = _bs(learn.yb)
        self.total += float(learn.loss.detach().float().mean()) * bs
        self.count += bs

    @property
    def value(self):
        return self.total / self.count if self.count else None

    @property
    def name(self) -> str:
        return "loss"


def loss_value(loss: torch.Tensor) -> float:
    """A batch's loss as a Python float (the mean of a loss that is not a scalar); ``item()``
    is the cheapest read of a scalar, which matters once per batch."""
    return loss.item() if loss.numel() == 1 else float(loss.detach().float().mean())


class AvgSmoothLoss(Metric):
    """Exponentially weighted moving average of the loss, debiased (``beta=0.98``)."""

    def __init__(self, beta: float = 0.98):
        self.beta = beta

    def reset(self) -> None:
        self.count, self.val = 0, 0.0

    def accumulate(self, learn) -> None:
        self.add(loss_value(learn.loss))

    def add(self, loss: float) -> None:
        self.count += 1
        self.val = self.beta * self.val + (1 - self.beta) * loss  # == torch.lerp(loss, val, beta)

    @property
    def value(self) -> float | None:
        return self.val / (1 - self.beta**self.count) if self.count else None


class Perplexity(AvgLoss):
    """``exp`` of the mean validation loss (for language models)."""

    @property
    def value(self):
        return math.exp(self.total / self.count) if self.count else None

    @property
    def name(self) -> str:
        return "perplexity"


class AccumMetric(Metric):
    """Keep every prediction and target of the epoch; ``func(preds, targs)`` at the end.

    ``dim_argmax``: take the argmax over this dim of the predictions first (classification);
    ``activation``: ``"softmax"``, ``"sigmoid"`` or ``None`` before that; ``flatten``: flatten
    both to 1-D first (after the argmax).
    """

    def __init__(self, func: Callable, dim_argmax: int | None = None, activation: str | None = None,
                 thresh: float | None = None, flatten: bool = True, name: str | None = None):
        self.func, self.dim_argmax, self.activation = func, dim_argmax, activation
        self.thresh, self.flatten, self._name = thresh, flatten, name

    def reset(self) -> None:
        self.preds, self.targs = [], []

    def accumulate(self, learn) -> None:
        pred = learn.pred.detach().float()
        if self.activation == "softmax":
            pred = pred.softmax(dim=self.dim_argmax if self.dim_argmax is not None else -1)
        elif self.activation == "sigmoid":
            pred = pred.sigmoid()
        if self.dim_argmax is not None:
            pred = pred.argmax(dim=self.dim_argmax)
        if self.thresh is not None:
            pred = pred >= self.thresh
        targ = learn.yb[0].detach()
        if self.flatten:
            pred, targ = pred.reshape(-1), targ.reshape(-1)
        self.preds.append(pred.cpu())
        self.targs.append(targ.cpu())

    @property
    def value(self):
        if not self.preds:
            return None
        return self.func(torch.cat(self.preds), torch.cat(self.targs))

    @property
    def name(self) -> str:
        return self._name or getattr(self.func, "__name__", type(self.func).__name__)


def _check(pred: torch.Tensor, targ: torch.Tensor) -> None:
    if pred.numel() != targ.numel():
        raise ValueError(f"metric: {pred.numel()} predictions but {targ.numel()} targets "
                         f"(shapes {tuple(pred.shape)} and {tuple(targ.shape)})")


# -- classification --------------------------------------------------------------------------

def accuracy(pred: torch.Tensor, targ: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """Share of argmax predictions equal to the targets."""
    p = pred.argmax(dim=axis).reshape(-1)
    t = targ.reshape(-1)
    _check(p, t)
    return (p == t).float().mean()


def error_rate(pred: torch.Tensor, targ: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """``1 - accuracy``."""
    return 1 - accuracy(pred, targ, axis)


def top_k_accuracy(pred: torch.Tensor, targ: torch.Tensor, k: int = 5, axis: int = -1) -> torch.Tensor:
    """Share of targets among the ``k`` highest predictions."""
    top = pred.topk(k=k, dim=axis).indices
    return (top == targ.unsqueeze(axis)).any(dim=axis).float().mean()


def _f1(preds: torch.Tensor, targs: torch.Tensor, average: str, num_classes: int | None,
        pos_label: int) -> float:
    _check(preds, targs)
    preds, targs = preds.long(), targs.long()
    if average == "binary":
        tp = ((preds == pos_label) & (targs == pos_label)).sum().item()
        fp = ((preds == pos_label) & (targs != pos_label)).sum().item()
        fn = ((preds != pos_label) & (targs == pos_label)).sum().item()
        return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    n = num_classes or int(max(preds.max().item(), targs.max().item())) + 1
    classes = torch.arange(n)
    tp = ((preds[:, None] == classes) & (targs[:, None] == classes)).sum(0).double()
    fp = ((preds[:, None] == classes) & (targs[:, None] != classes)).sum(0).double()
    fn = ((preds[:, None] != classes) & (targs[:, None] == classes)).sum(0).double()
    if average == "micro":
        denom = 2 * tp.sum() + fp.sum() + fn.sum()
        return float(2 * tp.sum() / denom) if denom else 0.0
    denom = 2 * tp + fp + fn
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))
    if average == "macro":
        present = (targs[:, None] == classes).any(0) | (preds[:, None] == classes).any(0)
        return float(f1[present].mean()) if present.any() else 0.0
    support = (targs[:, None] == classes).sum(0).double()
    return float((f1 * support).sum() / support.sum())  # weighted


class F1Score(AccumMetric):
    """F1 over the whole epoch. ``average``: ``"macro"`` (mean over classes that occur in the
    targets or predictions), ``"micro"`` (pooled counts), ``"weighted"`` (by support) or
    ``"binary"`` (class ``pos_label`` only). Predictions are the argmax over ``axis``."""

    def __init__(self, average: str = "macro", axis: int = -1, num_classes: int | None = None,
                 pos_label: int = 1):
        if average not in ("macro", "micro", "weighted", "binary"):
            raise ValueError(f"F1Score average must be macro, micro, weighted or binary; got {average!r}")
        super().__init__(lambda p, t: _f1(p, t, average, num_classes, pos_label), dim_argmax=axis,
                         name=f"f1_{average}")


# -- regression -------------------------------------------------------------------------------

def mae(pred: torch.Tensor, targ: torch.Tensor) -> torch.Tensor:
    """Mean absolute error."""
    _check(pred, targ)
    return (pred.reshape(-1).float() - targ.reshape(-1).float()).abs().mean()


def mse(pred: torch.Tensor, targ: torch.Tensor) -> torch.Tensor:
    """Mean squared error."""
    _check(pred, targ)
    return ((pred.reshape(-1).float() - targ.reshape(-1).float()) ** 2).mean()


def _rmse(preds: torch.Tensor, targs: torch.Tensor) -> float:
    return float(mse(preds.double(), targs.double()).sqrt())


def _r2(preds: torch.Tensor, targs: torch.Tensor) -> float:
    _check(preds, targs)
    p, t = preds.double(), targs.double()
    ss_res = ((t - p) ** 2).sum()
    ss_tot = ((t - t.mean()) ** 2).sum()
    return float(1 - ss_res / ss_tot) if ss_tot > 0 else float("nan")


class RMSE(AccumMetric):
    """Root mean squared error over the whole epoch."""

    def __init__(self):
        super().__init__(_rmse, name="rmse")


class R2Score(AccumMetric):
    """Coefficient of determination ``1 - SS_res / SS_tot`` over the whole epoch."""

    def __init__(self):
        super().__init__(_r2, name="r2_score")


rmse, r2_score, perplexity = RMSE, R2Score, Perplexity


def mk_metric(m) -> Metric:
    """A ``Metric`` as is (a class is instantiated first); a function is wrapped in ``AvgMetric``."""
    if isinstance(m, type):
        m = m()
    if isinstance(m, Metric):
        return m
    if callable(m):
        return AvgMetric(m)
    raise TypeError(f"not a metric: {m!r} (pass a Metric or a function f(pred, targ))")


__all__ = ["AccumMetric", "AvgLoss", "AvgMetric", "AvgSmoothLoss", "F1Score", "Metric", "loss_value",
           "Perplexity", "R2Score", "RMSE", "accuracy", "error_rate", "mae", "mk_metric", "mse",
           "perplexity", "r2_score", "rmse", "top_k_accuracy"]
