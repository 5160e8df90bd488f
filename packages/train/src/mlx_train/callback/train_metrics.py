"""``TrainMetrics``: training loss, learning rate, gradient norm, throughput and peak memory every
``log_every`` optimizer steps, sent to the run's logger callbacks; ``run_loggers`` builds the
set the recipes use (``logger=default``: CSV and TensorBoard; MLflow / W&B on request).

Per step the callback only adds to tensors on the model's device (the loss, the token count);
the values are read to the host once per interval, so logging adds no synchronisation to the
steps in between. The gradient norm is taken at the interval's last step only, and then from
``GradientClip`` when it already computed it (the norm before clipping).

Each row goes to the attached ``SinkCallback``s (``mlx_train.sinks``: ``MetricsCSVLogger``,
``TensorBoardCallback``, ``MLflowCallback``, ``WandbCallback``). While ``TrainMetrics`` is
attached it is their only source of per-step values (their own per-batch loss / lr logging is
off), so each tag has one writer. A training loop without a Learner (``pretrain backend=jax``)
makes the same rows and sends them through the same sinks (``mlx_train.sinks.Sinks``).

Under ``torch.distributed`` (``mlx train RECIPE --nproc N``: DDP or FSDP2) the rows describe
the GLOBAL batch, not rank 0's share of it: every process keeps a ``TrainMetrics`` (one
without sinks on the processes other than rank 0, which alone writes; see
``TrainMetrics.join_ranks``) and at each logged row, once, the processes exchange their
interval's sums in one collective of a small tensor (``all_gather``): the losses and batch
counts, the tokens or items, the ``batch_metrics``' totals and counts, the peak memory.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from typing import Literal

import torch

from mlx_train.callback.core import Callback
from mlx_train.callback.loggers import (
    CSVLogger,
    MetricsCSVLogger,
    MLflowCallback,
    SinkCallback,
    TensorBoardCallback,
    WandbCallback,
)
from mlx_train.sinks import Sinks

IGNORE_INDEX = -100


def peak_memory_mib(device: torch.device | None = None) -> float:
    """Peak memory so far, in MiB: CUDA's ``max_memory_allocated`` for a CUDA ``device``, else
    the process's peak resident set size (``ru_maxrss``; 0.0 where the platform has none)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def batch_size(xb, yb) -> int:
    for t in (*xb, *yb):
        if isinstance(t, torch.Tensor) and t.dim():
            return t.shape[0]
    return 1


def count_tokens(xb, yb) -> torch.Tensor | None:
    """Tokens in a token batch, as a tensor on the batch's device (no sync), or None when the
    batch is not made of token ids. A token batch has 2-D integer ids ``xb[0]`` and, of the same
    shape, an attention mask ``xb[1]`` (counted: the real, non-padding tokens) or labels
    ``yb[0]`` (counted: labels != -100). Integer inputs without either (a table's category
    codes) are not tokens."""
    ids = xb[0] if xb else None
    if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point()):
        return None
    for cand, keep in ((xb[1] if len(xb) > 1 else None, lambda m: m != 0),
                       (yb[0] if yb else None, lambda y: y != IGNORE_INDEX)):
        if isinstance(cand, torch.Tensor) and cand.shape == ids.shape \
                and not cand.is_floating_point():
            return keep(cand).sum()
    return None


def full_value(t):
    """``t`` as a plain tensor: a ``DTensor`` (FSDP2's gradients and their norms) as its whole
    value (``full_tensor()``: no communication for a replicated one, as
    ``get_total_norm`` / ``clip_grad_norm_`` return it, else a collective every process must
    join); anything else as it is."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def grad_norm(model: torch.nn.Module, norm_type: float = 2.0) -> torch.Tensor | None:
    """The ``norm_type`` norm of all the gradients together (with FSDP2, over every shard: a
    collective, so every process must call it)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    return full_value(torch.nn.utils.get_total_norm(grads, norm_type))


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def summed_state(metric) -> tuple[str, ...]:
    """The attributes of a batch metric that add up over the processes: its
    ``sum_over_ranks`` when it names them, else ``("total", "count")`` when it keeps both
    (``AvgMetric``, ``AvgLoss``, dpo's ``RewardMetric``: its value is then ``total / count``
    over the global batch), else none (its value stays rank 0's)."""
    names = getattr(metric, "sum_over_ranks", None)
    if names is not None:
        return tuple(names)
    return ("total", "count") if hasattr(metric, "total") and hasattr(metric, "count") else ()


class TrainMetrics(Callback):
    """Every ``log_every`` optimizer steps, log (keys of ``values``; CSV columns drop ``train/``):

    - ``train/loss``: the mean training loss of the interval's batches;
    - ``train/lr``: layer group 0's learning rate (``train/lr_<i>`` for the other groups when
      there are several);
    - ``train/grad_norm``: the global 2-norm of the gradients at the interval's last step,
      before clipping;
    - ``train/tokens_per_s`` for token batches (real tokens, see ``count_tokens``), else
      ``train/items_per_s``: over the interval's training time (validation excluded);
    - ``train/peak_mem_mib``: peak memory so far (``peak_memory_mib``);
    - ``train/<name>`` for each of ``batch_metrics`` (``mlx_train.metrics.Metric``s, empty by
      default; a recipe adds them, e.g. dpo's rewards): accumulated over the interval's
      training batches, as they are over a validation epoch.

    Several processes (``torch.distributed``, joined by ``join_ranks``, which
    ``DistributedCallback`` calls): the row is the global batch's. ``train/loss`` is the mean
    over every process's batches (the recipes' ``DistributedCallback(loss_count=...)`` already
    makes each process's loss the global batch's, so the row equals the one-process run's;
    without it, the mean of the processes' own means, which DDP's averaged gradient follows);
    the tokens / items are every process's, over rank 0's interval time; each batch metric
    sums its ``summed_state`` (totals and counts) over the processes before its ``value``;
    ``train/grad_norm`` is the norm of the whole gradient (DDP's are already averaged; FSDP2's
    sharded ``DTensor`` norm is taken whole, ``full_value``); ``train/peak_mem_mib`` is the
    largest of the processes' peaks. Only rank 0 sends rows to the sinks.

    The step is ``learn.train_iter`` (training batches done, restored on resume; with gradient
    accumulation several batches make one step), as the tracker loggers use. Each row also goes
    to ``self.rows``; a last, shorter interval is logged when the fit ends.
    """

    order = 12  # after MixedPrecision (10) and GradientClip (11); before the loggers (60)
    run_valid = False

    def __init__(self, log_every: int = 10):
        if log_every < 1:
            raise ValueError(f"log_every must be at least 1 (optimizer steps), got {log_every}")
        self.log_every = log_every
        self.rows: list[dict] = []
        self.batch_metrics: list = []
        # set by join_ranks: reduce each row over the processes (every one has a TrainMetrics)
        self.across_ranks = False
        self.reduce_metrics = True  # False: the batch metrics could not be sent to every rank
        self.joined = False  # added by join_ranks to a process without one: detached at the end
        self.rank = 0

    @classmethod
    def join_ranks(cls, learn) -> TrainMetrics | None:
        """Make every process's step metrics take part in the per-row reduction; every process
        must call it, at ``before_fit`` before ``TrainMetrics``' own (``DistributedCallback``
        does). Rank 0's ``TrainMetrics`` decides (the recipes attach loggers on rank 0 only):
        its ``log_every`` and copies of its ``batch_metrics`` go to the other processes, and
        one without a ``TrainMetrics`` gets one (no sinks; detached when the fit ends). Rank 0
        without one: nothing is reduced. Returns this process's ``TrainMetrics`` (or None)."""
        import pickle
        import warnings

        import torch.distributed as dist

        rank, world = _rank_world()
        own = learn.cb("train_metrics")
        if world < 2:
            return own
        spec = None
        if rank == 0 and own is not None:
            try:
                metrics = pickle.dumps(own.batch_metrics)
            except Exception as e:  # noqa: BLE001 - any pickling failure: rank 0's values
                warnings.warn(f"TrainMetrics: the batch metrics cannot be sent to the other "
                              f"processes ({e}); their values are rank 0's", stacklevel=2)
                metrics = None
            spec = (own.log_every, metrics)
        box = [spec]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            if own is not None:
                own.across_ranks = False
            return own
        log_every, metrics = box[0]
        if rank != 0:
            added = own is None
            if added:
                own = cls(log_every)
                own.joined = True
            own.log_every = log_every
            if metrics is not None:
                own.batch_metrics = pickle.loads(metrics)
            if added:
                learn.add_cb(own)
                own("before_fit")  # this event is under way: it has passed this process's list
        own.across_ranks, own.reduce_metrics = True, metrics is not None
        return own

    # -- the interval's running totals -------------------------------------------------------
    def _reset(self) -> None:
        self.n_batches = self.n_steps = 0
        self.loss_sum = self.token_sum = None
        self.n_items = 0
        self.train_s = 0.0
        self.norm = None
        for metric in self.batch_metrics:
            metric.reset()

    def before_fit(self):
        self._reset()
        self.sinks = [cb for cb in self.learn.cbs if isinstance(cb, SinkCallback)]
        p = next(self.learn.model.parameters(), None)
        self.device = p.device if p is not None else torch.device("cpu")
        self.rank = _rank_world()[0]
        self.tokens = None  # token batches or not: decided by the first batch
        self.started = None

    def before_train(self):
        self.started = time.perf_counter()

    def after_train(self):
        if self.started is not None:
            self.train_s += time.perf_counter() - self.started
            self.started = None

    def after_step(self):
        # the gradients are still there (zero_grad comes after this event), unscaled by
        # MixedPrecision; GradientClip clipped them in place, but kept the norm it measured
        self.n_steps += 1
        if self.n_steps % self.log_every == 0:
            clip = self.learn.cb("gradient_clip")
            if clip is not None:
                self.norm = getattr(clip, "last_norm", None)
                if self.norm is not None:
                    self.norm = full_value(self.norm)  # FSDP2: a replicated DTensor
            else:
                self.norm = grad_norm(self.learn.model)
            self._due = True

    def after_batch(self):
        learn = self.learn
        if not learn.yb:
            return
        loss = learn.loss  # detached already
        if loss.dim():
            loss = loss.mean()
        if self.loss_sum is None:
            self.loss_sum = loss.float().clone()
        else:
            self.loss_sum += loss  # in place, on the device: nothing read back per batch
        self.n_batches += 1
        for metric in self.batch_metrics:
            metric.accumulate(learn)
        tokens = count_tokens(learn.xb, learn.yb)
        if self.tokens is None:
            self.tokens = tokens is not None
        if tokens is not None:
            self.token_sum = tokens if self.token_sum is None else self.token_sum + tokens
        else:
            self.n_items += batch_size(learn.xb, learn.yb)
        if self.__dict__.pop("_due", False):
            self.log(learn.train_iter)

    def after_fit(self):
        if self.n_batches:  # the last, shorter interval
            self.after_train()
            self.log(self.learn.train_iter)
        self.cleanup()

    def cleanup(self):
        learn = self.__dict__.get("learn")
        # the fit is over (not a validate() inside it): the next fit joins again, or runs alone
        if learn is not None and not getattr(learn, "in_fit", False):
            self.across_ranks = False
            if self.joined:
                learn.remove_cb(self)  # join_ranks added it for this fit

    # -- reading the interval and sending it --------------------------------------------------
    def values(self) -> dict[str, float]:
        """The interval's values (one host sync for the device tensors; with several processes
        joined, one collective first, which every process must reach)."""
        now = time.perf_counter()
        seconds = self.train_s + (now - self.started if self.started is not None else 0.0)
        if self.started is not None:
            self.started = now
        device = self.loss_sum.device if self.loss_sum is not None else self.device
        summed = [self.loss_sum if self.loss_sum is not None else 0.0, float(self.n_batches),
                  self.token_sum if self.token_sum is not None else float(self.n_items)]
        states = [(m, a) for m in self.batch_metrics for a in summed_state(m)] \
            if self.across_ranks and self.reduce_metrics else []
        summed += [getattr(m, a) if getattr(m, a) is not None else 0.0 for m, a in states]
        packed = torch.stack([torch.as_tensor(v).to(device, torch.float64) for v in summed])
        peak = peak_memory_mib(self.device)
        if self.across_ranks:
            packed, peak = self._reduce(packed, peak)
        if self.norm is not None:
            packed = torch.cat([packed, torch.as_tensor(self.norm).to(packed).reshape(1)])
        read = packed.tolist()
        loss_sum, n_batches, count = read[:3]
        values = {"train/loss": loss_sum / n_batches if n_batches else float("nan")}
        hypers = self.learn.opt.hypers if self.learn.opt is not None else []
        for i, h in enumerate(hypers):
            values["train/lr" if i == 0 else f"train/lr_{i}"] = float(h["lr"])
        if self.norm is not None:
            values["train/grad_norm"] = read[-1]
        rate = count / seconds if seconds > 0 else 0.0
        values["train/tokens_per_s" if self.tokens else "train/items_per_s"] = rate
        values["train/peak_mem_mib"] = peak
        for (metric, attr), total in zip(states, read[3:3 + len(states)], strict=True):
            # the global batch's sums, so that ``value`` is the global batch's
            setattr(metric, attr, round(total) if isinstance(getattr(metric, attr), int)
                    else total)
        for metric in self.batch_metrics:
            if (value := metric.value) is not None:
                values[f"train/{metric.name}"] = float(value)
        return values

    def _reduce(self, packed: torch.Tensor, peak: float) -> tuple[torch.Tensor, float]:
        """Every process's ``packed`` sums added up, and the largest ``peak``: one
        ``all_gather`` of one small tensor per process (on the CPU for gloo)."""
        import torch.distributed as dist

        mine = torch.cat([packed, packed.new_tensor([peak])])
        if dist.get_backend() == "gloo":
            mine = mine.cpu()
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        every = torch.stack(gathered)
        return every[:, :-1].sum(0).to(packed.device), float(every[:, -1].max())

    def log(self, step: int) -> dict:
        values = self.values()
        self.rows.append({"step": step, "epoch": self.learn.epoch, **values})
        if not self.across_ranks or self.rank == 0:  # one writer for the processes
            for sink in self.sinks:
                sink.log_step(step, self.learn.epoch, values)
        started = self.started
        self._reset()
        self.started = started
        return values


Switch = bool | Literal["auto"]


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def run_loggers(log_every: int = 10, csv: bool = True, tensorboard: Switch = "auto",
                mlflow: Switch = False, wandb: Switch = False, history: bool = True,
                tensorboard_dir: str = "tensorboard", csv_file: str = "train_metrics.csv",
                experiment: str | None = None, project: str | None = None) -> list[Callback]:
    """The logger callbacks of a recipe run (the ``logger=default`` config), all writing under
    the learner's ``path`` (the run directory):

    - ``TrainMetrics(log_every)``, the source of the per-step values;
    - ``csv``: ``MetricsCSVLogger`` (``csv_file``); ``history``: the epoch table, ``CSVLogger``
      (``history.csv``);
    - ``tensorboard``: ``TensorBoardCallback`` in ``tensorboard_dir`` (per step and per epoch);
    - ``mlflow`` (``experiment``), ``wandb`` (``project``): the tracker callbacks.

    ``"auto"``: on when the package is installed. ``True`` fails here, before any training, when
    it is not, naming the pip install."""
    cbs: list[Callback] = [TrainMetrics(log_every)]
    if csv:
        cbs.append(MetricsCSVLogger(csv_file, append=True))
    if history:
        cbs.append(CSVLogger("history.csv", append=True))
    if tensorboard is True or (tensorboard == "auto" and installed("tensorboard")):
        cbs.append(TensorBoardCallback(tensorboard_dir))
    if mlflow is True or (mlflow == "auto" and installed("mlflow")):
        cbs.append(MLflowCallback(experiment=experiment))
    if wandb is True or (wandb == "auto" and installed("wandb")):
        cbs.append(WandbCallback(project=project))
    return cbs


def where_logged(learn) -> list[str]:
    """One line per place the learner's loggers write to (for the recipe to print)."""
    metrics = learn.cb("train_metrics")
    sinks = [cb.sink for cb in learn.cbs if isinstance(cb, SinkCallback)]
    return describe_logs(sinks, Path(learn.path), metrics.log_every if metrics else None)


def describe_logs(sinks, directory: Path, log_every: int | None) -> list[str]:
    """How often step rows are made (``log_every`` optimizer steps; None: no step rows) and,
    one line each, where ``sinks`` write under ``directory``."""
    lines = [f"step metrics every {log_every} optimizer steps"] if log_every else []
    return lines + Sinks(sinks).where(directory)


__all__ = ["TrainMetrics", "count_tokens", "describe_logs", "full_value", "grad_norm",
           "peak_memory_mib", "run_loggers", "summed_state", "where_logged"]
