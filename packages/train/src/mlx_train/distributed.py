"""Data-parallel training under ``torchrun``: ``DistributedCallback`` wraps the model in
``DistributedDataParallel`` and shards the training data, one shard per process.

A ``Learner`` built in a process whose environment has ``WORLD_SIZE > 1`` (as ``torchrun``
sets, with ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) gets the callback
automatically; the process group starts at the first fit (``gloo`` on CPU, ``nccl`` on CUDA,
where each process takes the GPU ``LOCAL_RANK``). Semantics:

- the DataLoaders' batch size is the GLOBAL batch: each of the ``W`` processes takes
  ``bs / W`` items per step (``bs`` must divide), and DDP averages the gradients, so a run on
  ``W`` processes takes the same steps as one process with batch ``bs``;
- the training items are shuffled by ``DistributedSampler`` (the same permutation on every
  process, from ``seed`` + epoch; ``seed`` defaults to the loader's generator seed) and dealt
  out in turn; loaders with a batch sampler (``BucketSampler``) deal whole batches instead;
- validation is not sharded: every process validates on the whole validation set, so metrics
  are exact and equal everywhere; only rank 0 prints the epoch table and progress bars;
- only the training phase runs through DDP; callbacks and ``learn.save`` see the plain model
  (keys without ``module.``). Write files from rank 0 only (``is_main_process()``).

``DistributedCallback(split_batches=True, loss_count="auto")`` (what the recipes use) makes a
run on ``W`` processes take exactly the steps of one process: every process draws the SAME
batches from the loader's own sampler and generator and keeps its ``1/W`` slice of each
(``SplitBatchSampler``), and each process's mean loss is re-weighted by its share of the
global batch's loss terms (tokens for ``CausalLMLoss``), so the averaged gradient is the
gradient of the global batch's mean even when the slices hold different numbers of tokens.
``learn.loss`` is then the global batch's loss on every process. ``ddp=False`` leaves the model
as it is (one already sharded with FSDP2 ``fully_shard``, which averages gradients itself).

Step metrics (``TrainMetrics``, attached on rank 0 alone by the recipes): at ``before_fit``
every process joins them (``TrainMetrics.join_ranks``), so that each logged row is reduced
over the processes (the global batch's loss, tokens, batch metrics, gradient norm) and written
by rank 0.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.data.distributed import DistributedSampler

from mlx_train.callback.core import Callback
from mlx_train.data import Loader


def world_info() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)``: from the process group when it is up, else from the
    environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; a single process without them)."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def is_distributed_env() -> bool:
    """True in a process launched by ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    return world_info()[0] == 0


def setup_distributed(backend: str | None = None) -> tuple[int, int, int]:
    """Start the default process group from the environment if it is not up yet (``backend``:
    ``nccl`` when CUDA is available, else ``gloo``); returns ``world_info()``."""
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
                   if k not in os.environ]
        if missing:
            raise RuntimeError(f"distributed training needs {', '.join(missing)} in the "
                               "environment: launch with torchrun --nproc_per_node N script.py")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend)
    rank, world, local = world_info()
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        torch.cuda.set_device(local)
    return rank, world, local


class ShardedBatchSampler:
    """Every ``world``-th batch of ``batch_sampler``, starting at ``rank``; all ranks get
    ``len(batch_sampler) // world`` batches (a remainder is dropped, so no rank waits)."""

    def __init__(self, batch_sampler, rank: int, world: int):
        self.batch_sampler, self.rank, self.world = batch_sampler, rank, world
        self.generator = getattr(batch_sampler, "generator", None)

    def __iter__(self):
        n = len(self)
        for i, batch in enumerate(self.batch_sampler):
            if i // self.world >= n:
                return
            if i % self.world == self.rank:
                yield batch

    def __len__(self) -> int:
        return len(self.batch_sampler) // self.world


def shard_loader(loader: Loader, rank: int, world: int, seed: int | None = None) -> Loader:
    """A ``Loader`` over this rank's shard of ``loader``'s training data (see the module doc)."""
    dl = loader.dl
    if not isinstance(dl, DataLoader):
        raise TypeError("distributed training shards torch DataLoaders; got "
                        f"{type(dl).__name__}")
    common = dict(num_workers=dl.num_workers, collate_fn=dl.collate_fn, pin_memory=dl.pin_memory)
    if dl.batch_size is None:  # a batch sampler: deal whole batches
        new = DataLoader(dl.dataset, batch_sampler=ShardedBatchSampler(dl.batch_sampler, rank, world),
                         **common)
        return Loader(new, loader.after_batch, loader.aug)
    if dl.batch_size % world:
        raise ValueError(f"the batch size {dl.batch_size} is the global batch and must divide "
                         f"by the {world} processes")
    if seed is None:
        g = dl.generator or getattr(dl.sampler, "generator", None)
        seed = g.initial_seed() if isinstance(g, torch.Generator) else 0
    if type(dl.sampler).__name__ not in ("RandomSampler", "SequentialSampler"):
        raise TypeError(f"cannot shard a loader with a {type(dl.sampler).__name__}: distributed "
                        "training uses DistributedSampler (plain shuffled or ordered loaders)")
    sampler = DistributedSampler(dl.dataset, num_replicas=world, rank=rank,
                                 shuffle=isinstance(dl.sampler, RandomSampler), seed=seed,
                                 drop_last=dl.drop_last)
    new = DataLoader(dl.dataset, batch_size=dl.batch_size // world, sampler=sampler,
                     drop_last=dl.drop_last, **common)
    return Loader(new, loader.after_batch, loader.aug)


class SplitBatchSampler:
    """Each batch of ``batch_sampler`` split over the processes: rank ``r`` keeps items ``r``,
    ``r + world``, ... of it, so together the processes see exactly the batches one process
    would (same order, shuffling and sizes). A batch smaller than ``world`` (a last, short one)
    is skipped on every rank: no rank may sit out a step the others take."""

    def __init__(self, batch_sampler, rank: int, world: int):
        self.batch_sampler, self.rank, self.world = batch_sampler, rank, world
        # the generator the loader's state (save / resume) is read from
        inner = getattr(batch_sampler, "sampler", None)
        self.generator = getattr(batch_sampler, "generator", None) or getattr(inner, "generator", None)

    def __iter__(self):
        for batch in self.batch_sampler:
            batch = list(batch)
            if len(batch) >= self.world:
                yield batch[self.rank::self.world]

    def __len__(self) -> int:
        # one process's count: the schedules (pct_train) then match a one-process run
        return len(self.batch_sampler)


def split_loader(loader: Loader, rank: int, world: int) -> Loader:
    """A ``Loader`` whose batches are this rank's slices of ``loader``'s (``SplitBatchSampler``);
    it draws from the same sampler and generator, so every rank agrees on each batch."""
    dl = loader.dl
    if not isinstance(dl, DataLoader) or dl.batch_sampler is None:
        raise TypeError("split_batches needs a map-style torch DataLoader with a batch size or a "
                        f"batch sampler; got {type(dl).__name__}")
    new = DataLoader(dl.dataset, batch_sampler=SplitBatchSampler(dl.batch_sampler, rank, world),
                     num_workers=dl.num_workers, collate_fn=dl.collate_fn,
                     pin_memory=dl.pin_memory, worker_init_fn=dl.worker_init_fn,
                     generator=dl.generator)  # draws its base seed as the original does
    return Loader(new, loader.after_batch, loader.aug)


def loss_terms(learn) -> torch.Tensor:
    """How many terms ``learn.loss_func`` averaged over in this batch, as a tensor: next-token
    labels that are not ignored for ``CausalLMLoss``, labels that are not ``ignore_index`` for
    a loss that has one, else the batch size (a mean over items)."""
    from mlx_train.losses import CausalLMLoss

    loss_func, y = learn.loss_func, learn.yb[0] if learn.yb else None
    device = learn.loss.device
    if isinstance(y, torch.Tensor) and not y.is_floating_point():
        ignore = getattr(loss_func, "ignore_index", None)
        if isinstance(loss_func, CausalLMLoss) and y.dim() == 2:
            return (y[:, 1:] != ignore).sum().to(device)
        if ignore is not None:
            return (y != ignore).sum().to(device)
    n = y.shape[0] if isinstance(y, torch.Tensor) and y.dim() else 1
    return torch.tensor(n, device=device)


class DistributedCallback(Callback):
    """Shard the training data over the processes and train through DDP (see the module doc).

    Added automatically under ``torchrun``; add it yourself to pass options: ``seed`` for the
    shuffling, ``backend``, ``find_unused_parameters`` for DDP. With one process it only
    re-deals the data the way a multi-process run would (useful to compare runs)."""

    order = -20  # before TrainEvalCallback counts the (sharded) training batches

    def __init__(self, seed: int | None = None, backend: str | None = None,
                 find_unused_parameters: bool = False, split_batches: bool = False,
                 loss_count=None, ddp: bool = True):
        """``split_batches``: slice every batch over the processes (see the module doc)
        instead of dealing items with ``DistributedSampler``. ``loss_count``: ``"auto"``
        (``loss_terms``) or a function ``learn -> tensor`` counting the terms of this batch's
        mean loss; given, losses are weighted to the global batch (see the module doc).
        ``ddp=False``: do not wrap the model (it is already sharded, e.g. FSDP2)."""
        self.seed, self.backend, self.find_unused = seed, backend, find_unused_parameters
        self.split_batches, self.wrap = split_batches, ddp
        self.loss_count = loss_terms if loss_count == "auto" else loss_count
        self.ddp = self.orig_train = None

    def before_fit(self):
        from torch.nn.parallel import DistributedDataParallel

        learn = self.learn
        rank, world, local = setup_distributed(self.backend) if is_distributed_env() or \
            (dist.is_available() and dist.is_initialized()) else (0, 1, 0)
        self.rank, self.world = rank, world
        if torch.cuda.is_available() and world > 1 and dist.get_backend() == "nccl":
            learn.model.to(torch.device("cuda", local))
        self.orig_train = learn.dls.train
        learn.dls.train = split_loader(self.orig_train, rank, world) if self.split_batches \
            else shard_loader(self.orig_train, rank, world, self.seed)
        if world > 1 and self.wrap:
            p = next(learn.model.parameters())
            self.ddp = DistributedDataParallel(
                learn.model, device_ids=[p.device.index] if p.device.type == "cuda" else None,
                find_unused_parameters=self.find_unused)
        if world > 1:  # every process joins the step metrics' per-row reduction (rank 0 writes)
            from mlx_train.callback.train_metrics import TrainMetrics

            TrainMetrics.join_ranks(learn)
        if rank != 0:
            from mlx_train.callback.progress import no_log

            self._quiet = (learn.logger, learn.show_bar)
            learn.logger, learn.show_bar = no_log, False

    def before_epoch(self):
        sampler = getattr(self.learn.dls.train.dl, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(self.learn.epoch)

    def before_train(self):
        if self.ddp is not None:
            self.learn.model = self.ddp

    def after_loss(self):
        learn = self.learn
        if self.loss_count is None or not learn.training or not learn.yb:
            return
        n = self.loss_count(learn).to(torch.float64)
        items = next((y.shape[0] for y in learn.yb if isinstance(y, torch.Tensor) and y.dim()), 1)
        # one all-reduce per step: the global batch's items, loss terms and summed loss
        sums = torch.stack([torch.tensor(float(items), dtype=torch.float64, device=n.device), n,
                            learn.loss.detach().to(torch.float64) * n])
        if self.world > 1:
            dist.all_reduce(sums)
        learn.batch_items = int(sums[0])  # GradientAccumulation counts global items
        total = sums[1]
        if float(n) == 0:  # nothing to learn from here, but every process must run backward
            learn.loss_grad = learn.pred.sum() * 0.0 if isinstance(learn.pred, torch.Tensor) \
                else learn.loss_grad * 0.0
        else:  # the gradient average over W processes then is the global batch's mean gradient
            learn.loss_grad = learn.loss_grad * (self.world * n / total).to(learn.loss_grad.dtype)
        learn.loss = (sums[2] / total.clamp_min(1)).to(learn.loss.dtype)

    def after_batch(self):
        self.learn.batch_items = None

    def after_train(self):
        if self.ddp is not None:
            self.learn.model = self.ddp.module

    def after_fit(self):
        self.cleanup()

    def cleanup(self):
        learn = self.learn
        if self.ddp is not None:
            learn.model = self.ddp.module
            self.ddp = None
        if self.orig_train is not None:
            learn.dls.train, self.orig_train = self.orig_train, None
        if hasattr(self, "_quiet"):
            learn.logger, learn.show_bar = self._quiet
            del self._quiet


def auto_callbacks(cbs) -> list[Callback]:
    """``[DistributedCallback()]`` under ``torchrun`` (``WORLD_SIZE > 1``) unless ``cbs`` has one."""
    if is_distributed_env() and not any(isinstance(c, DistributedCallback) for c in cbs):
        return [DistributedCallback()]
    return []


def sharded_len(n: int, bs: int, world: int, drop_last: bool = False) -> int:
    """Batches per rank for ``n`` items at global batch ``bs`` (DistributedSampler's padding)."""
    per = n // world if drop_last else math.ceil(n / world)
    b = bs // world
    return per // b if drop_last else math.ceil(per / b)


__all__ = ["DistributedCallback", "ShardedBatchSampler", "SplitBatchSampler", "auto_callbacks",
           "is_distributed_env", "is_main_process", "loss_terms", "setup_distributed",
           "shard_loader", "sharded_len", "split_loader", "world_info"]
