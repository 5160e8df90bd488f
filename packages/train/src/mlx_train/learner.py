"""The ``Learner``: a model, its data, a loss and an optimizer, trained by an event loop.

Every stage runs as ``before_X -> work -> (after_cancel_X on a CancelXException) -> after_X``
(see ``mlx_train.callback.core`` for the full list). State lives on the learner, where callbacks
read and change it: ``xb``, ``yb``, ``pred``, ``loss`` (and ``loss_grad``, the tensor that gets
the backward), ``epoch``, ``iter``, ``train_iter``, ``pct_train``, ``training``, ``opt``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mlx_train.callback import lr_finder, schedule
from mlx_train.callback.core import (
    EVENTS,
    Callback,
    CancelBackwardException,
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    CancelStepException,
    CancelTrainException,
    CancelValidException,
    TrainEvalCallback,
)
from mlx_train.callback.preds import GatherPredsCallback
from mlx_train.callback.progress import ProgressCallback, no_log
from mlx_train.callback.recorder import Recorder
from mlx_train.data import DataLoaders, Loader, as_tuple
from mlx_train.distributed import auto_callbacks
from mlx_train.losses import activation_for, decodes_for, default_loss_func
from mlx_train.metrics import mk_metric
from mlx_train.optimizer import (
    LayerGroupOptimizer,
    bias_params,
    check_groups,
    norm_params,
    trainable_params,
)


def print_row(row) -> None:
    """The default logger: one line per epoch row."""
    print("  ".join(f"{v:.6f}" if isinstance(v, float) else str(v) for v in row))


def _listify(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _to_device(b, device):
    if isinstance(b, torch.Tensor):
        return b if b.device == device else b.to(device, non_blocking=True)
    if isinstance(b, (tuple, list)):
        return type(b)(_to_device(o, device) for o in b)
    return b


class Learner:
    """Train ``model`` on ``dls`` (a ``DataLoaders``) with ``loss_func(pred, *targets)``.

    - ``opt_func(param_groups, lr=...)`` builds the torch optimizer (default ``torch.optim.AdamW``);
      ``wd`` overrides its weight decay, which never applies to norm parameters and biases
      (unless ``wd_bn_bias``).
    - ``splitter(model)`` returns the layer groups (lists of parameters or modules, earliest first)
      for discriminative lrs (``lr=slice(lo, hi)``) and ``freeze`` / ``freeze_to`` /
      ``unfreeze``; frozen groups keep their norm layers training when ``train_bn``.
    - ``loss_func`` defaults to ``model.loss_func``, the training dataset's ``loss_func``, or next-
      token cross-entropy for the mlx_core zoo ``Transformer``.
    - ``metrics``: functions ``f(pred, targ)`` or ``Metric``s, computed on the validation set.
    - ``path`` / ``model_dir``: where ``save`` / ``export`` / callbacks write files.
    - ``progress=False`` hides the progress bars (the epoch table still prints).
    """

    def __init__(self, dls: DataLoaders | None, model: nn.Module, loss_func: Callable | None = None,
                 opt_func: Callable = torch.optim.AdamW, lr: float = 1e-3, wd: float | None = None,
                 splitter: Callable | None = None, cbs=None, metrics=None, path: str | Path = ".",
                 moms: tuple = (0.95, 0.85, 0.95), model_dir: str = "models",
                 wd_bn_bias: bool = False, train_bn: bool = True, progress: bool = True):
        if isinstance(dls, (tuple, list)):
            dls = DataLoaders(*dls)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
        if loss_func is None:
            loss_func = default_loss_func(model, dls)
            if loss_func is None:
                raise ValueError(f"no loss function: pass loss_func= (e.g. nn.CrossEntropyLoss()); "
                                 f"{type(model).__name__} does not define one")
        self.dls, self.model, self.loss_func, self.opt_func = dls, model, loss_func, opt_func
        self.lr, self.wd, self.moms, self.splitter = lr, wd, moms, splitter or trainable_params
        self.path, self.model_dir = Path(path), model_dir
        self.wd_bn_bias, self.train_bn, self.show_bar = wd_bn_bias, train_bn, progress
        self.metrics = metrics
        # ("package.module:factory", kwargs) that rebuild the model, set by the learners that
        # know (vision_learner): export records it when given no model_factory of its own.
        self.model_recipe: tuple[str, dict] | None = None
        self.opt: LayerGroupOptimizer | None = None
        self.logger = print_row
        self.training = self.in_fit = False
        self.epoch = self.epochs_done = self.train_iter = self.start_epoch = 0
        self.n_epoch, self.pct_train = 1, 0.0
        self.dl = self.pred = self.loss = None
        self.xb, self.yb = (), ()
        self._dispatch_key, self._dispatch_table = None, {}
        self.cbs: list[Callback] = []
        self.add_cbs([TrainEvalCallback(), Recorder(), ProgressCallback(), *_listify(cbs)])
        self.add_cbs(auto_callbacks(self.cbs))  # DistributedCallback under torchrun
        self("after_create")

    # -- metrics and callbacks --------------------------------------------------------------
    @property
    def metrics(self) -> list:
        return self._metrics

    @metrics.setter
    def metrics(self, value) -> None:
        self._metrics = [mk_metric(m) for m in _listify(value)]

    def add_cb(self, cb) -> Learner:
        if isinstance(cb, type):
            cb = cb()
        if not isinstance(cb, Callback):
            raise TypeError(f"not a Callback: {cb!r}")
        cb.learn = self
        self.cbs.append(cb)
        return self

    def add_cbs(self, cbs) -> Learner:
        for cb in _listify(cbs):
            self.add_cb(cb)
        return self

    def remove_cb(self, cb) -> Learner:
        """Remove a callback instance, or every callback of a class."""
        targets = [c for c in self.cbs if isinstance(c, cb)] if isinstance(cb, type) else [cb]
        for c in targets:
            if c in self.cbs:
                self.cbs.remove(c)
                c.__dict__.pop("learn", None)
        return self

    def remove_cbs(self, cbs) -> Learner:
        for cb in _listify(cbs):
            self.remove_cb(cb)
        return self

    @contextlib.contextmanager
    def added_cbs(self, cbs):
        """Attach ``cbs`` for the duration of the block."""
        cbs = [cb() if isinstance(cb, type) else cb for cb in _listify(cbs)]
        self.add_cbs(cbs)
        try:
            yield self
        finally:
            self.remove_cbs(cbs)

    @contextlib.contextmanager
    def removed_cbs(self, cbs):
        """Detach ``cbs`` for the duration of the block."""
        cbs = _listify(cbs)
        self.remove_cbs(cbs)
        try:
            yield self
        finally:
            self.add_cbs(cbs)

    def cb(self, name: str) -> Callback | None:
        """The (last added) callback called ``name`` (``"recorder"``, ``"progress"``), or None."""
        found = [c for c in self.__dict__.get("cbs", []) if c.name == name]
        return found[-1] if found else None

    def __getattr__(self, name: str):
        # learn.recorder, learn.progress, learn.save_model, ...: callbacks by name
        if not name.startswith("_"):
            found = self.cb(name)
            if found is not None:
                return found
        raise AttributeError(f"'Learner' has no attribute or callback {name!r}")

    def ordered_cbs(self, event: str) -> list[Callback]:
        return [cb for cb in sorted(self.cbs, key=lambda c: c.order) if cb.handles(event)]

    def __call__(self, event: str | list[str]) -> None:
        if isinstance(event, str):  # the per-batch path: no list built
            for cb in self._dispatch(event):
                cb(event)
            return
        for name in _listify(event):
            for cb in self._dispatch(name):
                cb(name)

    def _dispatch(self, name: str) -> list[Callback]:
        """The callbacks that handle ``name``, in order; cached until the callback list changes
        (the per-batch cost of the loop is a dictionary lookup, not a sort per event)."""
        cbs = tuple(self.cbs)
        if cbs != self._dispatch_key:
            self._dispatch_key, self._dispatch_table = cbs, {}
        found = self._dispatch_table.get(name)
        if found is None:
            if name not in EVENTS:
                raise ValueError(f"unknown event {name!r}; events are: {', '.join(EVENTS)}")
            ordered = sorted(cbs, key=lambda c: c.order)
            # after_fit reaches every callback (Callback.__call__ resets `run` there), and so
            # does every event a callback that overrides __call__
            found = ordered if name == "after_fit" else [
                cb for cb in ordered if cb.handles(name) or type(cb).__call__ is not Callback.__call__]
            self._dispatch_table[name] = found
        return found

    def show_training_loop(self) -> str:
        """Which callbacks run at each event, in order (also printed)."""
        lines = [f"{e:22} {', '.join(map(repr, cbs))}" for e in EVENTS
                 if (cbs := self.ordered_cbs(e))]
        text = "\n".join(lines)
        print(text)
        return text

    # -- logging ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def no_logging(self):
        """No epoch table and no messages inside the block."""
        old, self.logger = self.logger, no_log
        try:
            yield self
        finally:
            self.logger = old

    @contextlib.contextmanager
    def no_bar(self):
        """No progress bars inside the block."""
        old, self.show_bar = self.show_bar, False
        try:
            yield self
        finally:
            self.show_bar = old

    def log_message(self, text: str) -> None:
        """Print a message from the loop (silent inside ``no_logging``)."""
        if self.logger is not no_log:
            print(text)

    # -- optimizer and layer groups ---------------------------------------------------------
    def create_opt(self) -> LayerGroupOptimizer:
        groups = check_groups(self.model, self.splitter(self.model))
        no_decay = [] if self.wd_bn_bias else norm_params(self.model) + bias_params(self.model)
        force = norm_params(self.model) if self.train_bn else []
        self.opt = LayerGroupOptimizer(self.opt_func, groups, self.lr, no_decay, force)
        if self.wd is not None:
            self.opt.set_hyper("wd", self.wd)
        return self.opt

    def freeze_to(self, n: int) -> None:
        """Freeze the layer groups before ``n`` (negative: from the end) and reset optimizer state."""
        if self.opt is None:
            self.create_opt()
        self.opt.freeze_to(n)
        self.opt.clear_state()

    def freeze(self) -> None:
        """Train only the last layer group (and norm layers, with ``train_bn``)."""
        self.freeze_to(-1)

    def unfreeze(self) -> None:
        self.freeze_to(0)

    # -- the loop ---------------------------------------------------------------------------
    def _with_events(self, f: Callable, stage: str, cancel: type[Exception], final=None) -> None:
        try:
            self(f"before_{stage}")
            f()
        except cancel:
            self(f"after_cancel_{stage}")
        self(f"after_{stage}")
        if final is not None:
            final()

    def _split(self, b: tuple) -> None:
        n = getattr(self.dls, "n_inp", None)
        if n is None:
            n = 1 if len(b) == 1 else len(b) - 1
        self.xb, self.yb = b[:n], b[n:]

    def _backward(self) -> None:
        self.loss_grad.backward()

    def _step(self) -> None:
        self.opt.step()

    def _do_one_batch(self) -> None:
        self.pred = self.model(*self.xb)
        self("after_pred")
        if self.yb:
            self.loss_grad = self.loss_func(self.pred, *self.yb)
            # detached, not cloned (a copy per batch shows in the loop's overhead): callbacks
            # replace loss_grad (loss_grad = loss_grad * k), never change it in place
            self.loss = self.loss_grad.detach()
        self("after_loss")
        if not self.training or not self.yb:
            return
        self._with_events(self._backward, "backward", CancelBackwardException)
        self._with_events(self._step, "step", CancelStepException)
        self.opt.zero_grad()

    def one_batch(self, i: int, b) -> None:
        self.iter = i
        cached = self.__dict__.get("_first_param")  # set per phase by all_batches
        if cached is None or cached[0] is not self.model:
            cached = (self.model, next(self.model.parameters(), None))
        b = as_tuple(b)
        if cached[1] is not None:
            b = _to_device(b, cached[1].device)
        self._split(b)
        self._with_events(self._do_one_batch, "batch", CancelBatchException)

    def all_batches(self) -> None:
        self.n_iter = len(self.dl)
        self._first_param = (self.model, next(self.model.parameters(), None))
        try:
            for i, b in enumerate(self.dl):
                self.one_batch(i, b)
        finally:
            self._first_param = None

    def _do_epoch_train(self) -> None:
        self.dl = self.dls.train
        self._with_events(self.all_batches, "train", CancelTrainException)

    def _do_epoch_validate(self, dl=None) -> None:
        self.dl = self.dls.valid if dl is None else dl
        with torch.no_grad():
            self._with_events(self.all_batches, "validate", CancelValidException)

    def _do_epoch(self) -> None:
        self._do_epoch_train()
        self._do_epoch_validate()

    def _do_fit(self) -> None:
        for epoch in range(self.start_epoch, self.n_epoch):
            self.epoch = epoch
            self._with_events(self._do_epoch, "epoch", CancelEpochException)

    def _end_cleanup(self) -> None:
        self.dl, self.pred, self.loss = None, None, None
        self.xb, self.yb = (), ()

    def _check_data(self, cbs) -> None:
        if self.dls is None or self.dls.train is None:
            raise ValueError("this learner has no training data (was it made by load_learner?); "
                             "set learn.dls = DataLoaders(train_dl, valid_dl) first")
        skips = any(getattr(cb, "skips_validation", False) for cb in [*self.cbs, *_listify(cbs)])
        if self.dls.valid is None and not skips:
            raise ValueError("fit needs a validation set, but the DataLoaders have none: pass "
                             "valid_ds to DataLoaders.from_dsets, or split the data with "
                             "DataLoaders.from_dataset(ds, RandomSplitter(0.2, seed=...))")

    def fit(self, n_epoch: int, lr=None, wd=None, cbs=None, reset_opt: bool = False,
            start_epoch: int = 0) -> None:
        """Train for epochs ``start_epoch .. n_epoch - 1`` at a constant ``lr`` (a number, one per
        layer group, or ``slice(lo, hi)``); ``cbs`` are attached for this call only.
        ``start_epoch`` resumes a fit after ``learn.load`` (see ``Learner.save``)."""
        self._check_data(cbs)
        if not 0 <= start_epoch <= n_epoch:
            raise ValueError(f"start_epoch must be in [0, n_epoch={n_epoch}], got {start_epoch}")
        with self.added_cbs(cbs):
            if reset_opt or self.opt is None:
                self.create_opt()
            wd = self.wd if wd is None else wd
            if wd is not None:
                self.opt.set_hyper("wd", wd)
            self.opt.set_hyper("lr", self.lr if lr is None else lr)
            self.n_epoch, self.start_epoch, self.in_fit = n_epoch, start_epoch, True
            try:
                self._with_events(self._do_fit, "fit", CancelFitException, self._end_cleanup)
            finally:
                self.in_fit, self.start_epoch = False, 0
                for cb in list(self.cbs):
                    cb.cleanup()

    # -- evaluation -------------------------------------------------------------------------
    def _loader(self, dl) -> Loader:
        if dl is None:
            if self.dls is None or self.dls.valid is None:
                raise ValueError("no validation set: pass dl=")
            return self.dls.valid
        if isinstance(dl, Loader):
            return dl
        return Loader(dl, self.dls.after_batch if self.dls is not None else ())

    def _run_validation(self, dl, cbs) -> None:
        with self.no_logging(), self.no_bar(), self.added_cbs(cbs):
            try:
                self._do_epoch_validate(dl)
            finally:
                for cb in list(self.cbs):
                    cb.cleanup()
                self._end_cleanup()

    def validate(self, dl=None, cbs=None) -> list:
        """``[valid_loss, *metrics]`` on ``dl`` (default: the validation loader)."""
        dl = self._loader(dl)
        if self.cb("recorder") is None:
            raise ValueError("validate needs the learner's Recorder callback")
        self._run_validation(dl, cbs)
        return self.recorder.valid_values()

    def get_preds(self, dl=None, with_input: bool = False, with_decoded: bool = False,
                  act: Callable | None = None, cbs=None) -> tuple:
        """``(preds, targets)`` over ``dl`` (default: the validation loader), in loader order.

        ``act`` turns outputs into predictions (default: from the loss, e.g. softmax for
        cross-entropy); ``with_input`` puts the inputs first; ``with_decoded`` appends the
        decoded predictions (e.g. argmax). A plain torch DataLoader gets the dls' batch
        transforms. ``targets`` is None for unlabelled data."""
        dl = self._loader(dl)
        gather = GatherPredsCallback(with_input=with_input)
        self._run_validation(dl, [gather, *_listify(cbs)])
        inputs, preds, targets = gather.results()
        act = act or activation_for(self.loss_func)
        preds = act(preds) if isinstance(preds, torch.Tensor) else preds
        res = [preds, targets]
        if with_input:
            res.insert(0, inputs)
        if with_decoded:
            res.append(decodes_for(self.loss_func)(preds) if isinstance(preds, torch.Tensor) else preds)
        return tuple(res)

    def predict(self, item) -> tuple:
        """Predict one item (a tensor without the batch dimension, or a tuple of inputs).

        Returns ``(label, decoded, probs)``: ``decoded`` is the decoded prediction (e.g. the
        class index), ``label`` its name from ``dls.vocab`` when there is one, ``probs`` the
        activated output."""
        dls = self.dls if self.dls is not None else DataLoaders()
        _, preds, _, decoded = self.get_preds(dl=dls.test_dl([item]), with_input=True,
                                              with_decoded=True)
        pred, dec = preds[0], decoded[0]
        label = dec
        if dls.vocab is not None and isinstance(dec, torch.Tensor) and dec.dim() == 0:
            label = dls.vocab[int(dec)]
        return label, dec, pred

    # -- schedules (mlx_train.callback.schedule) -------------------------------------------
    def fit_one_cycle(self, n_epoch: int, lr_max=None, div: float = 25.0, div_final: float = 1e5,
                      pct_start: float = 0.25, wd=None, moms=None, cbs=None,
                      reset_opt: bool = False, start_epoch: int = 0) -> None:
        """The 1cycle policy; see ``mlx_train.callback.schedule.fit_one_cycle``."""
        schedule.fit_one_cycle(self, n_epoch, lr_max, div, div_final, pct_start, wd, moms, cbs,
                               reset_opt, start_epoch)

    def fit_flat_cos(self, n_epoch: int, lr=None, div_final: float = 1e5, pct_start: float = 0.75,
                     wd=None, cbs=None, reset_opt: bool = False, start_epoch: int = 0) -> None:
        """Flat lr then cosine annealing; see ``mlx_train.callback.schedule.fit_flat_cos``."""
        schedule.fit_flat_cos(self, n_epoch, lr, div_final, pct_start, wd, cbs, reset_opt,
                              start_epoch)

    def fine_tune(self, epochs: int, base_lr: float = 2e-3, freeze_epochs: int = 1,
                  lr_mult: float = 100, pct_start: float = 0.3, div: float = 5.0, **kwargs) -> None:
        """Frozen 1cycle, then unfrozen 1cycle with discriminative lrs (fastai's fine_tune)."""
        schedule.fine_tune(self, epochs, base_lr, freeze_epochs, lr_mult, pct_start, div, **kwargs)

    def lr_find(self, start_lr=1e-7, end_lr=10, num_it: int = 100, stop_div: bool = True,
                show_plot: bool = True, suggest_funcs=(lr_finder.valley, lr_finder.steep,
                                                       lr_finder.minimum),
                fname: str | Path = "lr_find.png"):
        """The learning-rate finder; see ``mlx_train.callback.lr_finder.lr_find``."""
        return lr_finder.lr_find(self, start_lr, end_lr, num_it, stop_div, show_plot,
                                suggest_funcs, fname)

    # -- files (mlx_train.state, mlx_train.export) ------------------------------------------
    def _file(self, name: str | Path) -> Path:
        file = Path(name)
        if not file.suffix:
            file = file.with_suffix(".safetensors")
        return file if file.is_absolute() else self.path / self.model_dir / file

    def save(self, name: str | Path, with_opt: bool = True) -> Path:
        """Write the training state to ``path/model_dir/name.safetensors`` (atomically): the
        model, and with ``with_opt`` the optimizer, layer-group freezing, the loop position
        (epochs done, iterations), the recorder's history and the RNG states. After
        ``learn.load(name)``, ``fit(..., start_epoch=learn.epochs_done)`` (or ``fit_one_cycle``
        with the same arguments) continues exactly as an uninterrupted run would."""
        from mlx_train.state import save_state

        return save_state(self, self._file(name), with_opt=with_opt)

    def load(self, name: str | Path, with_opt: bool = True, strict: bool = True,
             resume: bool = True) -> Learner:
        """Read a file written by ``save`` (see there). ``with_opt=False`` loads the model only;
        ``resume=False`` loads the model and optimizer but leaves the loop position, the
        recorder's history and the RNG states as they are."""
        from mlx_train.state import load_state

        load_state(self, self._file(name), with_opt=with_opt, strict=strict, resume=resume)
        return self

    def export(self, fname: str | Path = "export.safetensors", model_factory: str | None = None,
               model_kwargs: dict | None = None) -> Path:
        """Write what inference needs to ``path/fname``; see ``mlx_train.export.export``."""
        from mlx_train.export import export

        return export(self, fname, model_factory=model_factory, model_kwargs=model_kwargs)

    def __repr__(self) -> str:
        return (f"Learner({type(self.model).__name__}, loss={type(self.loss_func).__name__}, "
                f"cbs={self.cbs})")


def load_learner(fname: str | Path, model: nn.Module | Callable | None = None,
                 loss_func: Callable | None = None, after_batch=(), device: str = "cpu"):
    """A ``Learner`` for inference (``predict``, ``get_preds``) from a file written by ``export``.

    ``model``: the module (or a function building it) when the export holds a custom model;
    ``loss_func``: needed to validate or train when the exported loss was a custom one;
    ``after_batch``: batch transforms that could not be exported."""
    from mlx_train.data import BATCH_TRANSFORMS
    from mlx_train.export import FORMAT, build_loss, build_model
    from mlx_train.state import read, restore_model

    path = Path(fname)
    tensors, meta = read(path, FORMAT)
    net = build_model(meta["model"], model)
    restore_model(net, tensors, meta["aliases"], strict=True)
    net.to(device).eval()
    loss = loss_func or build_loss(meta["loss"], tensors, meta["activation"], meta["decodes"])
    tfms = [BATCH_TRANSFORMS[d["type"]].from_dict(d) for d in meta["after_batch"]] + list(after_batch)
    dls = DataLoaders(after_batch=tfms, n_inp=meta["n_inp"], vocab=meta["vocab"])
    return Learner(dls, net, loss_func=loss, path=path.parent, progress=False)


__all__ = ["Learner", "load_learner", "print_row"]
