"""Events, cancel exceptions and the ``Callback`` base class of the training loop.

The loop (see ``Learner``) fires events in this order; a ``Cancel*Exception`` raised inside a
stage runs ``after_cancel_<stage>`` and then ``after_<stage>`` as usual::

    before_fit
      before_epoch                                   (per epoch)
        before_train
          before_batch                               (per training batch)
            after_pred, after_loss
            before_backward, after_cancel_backward, after_backward
            before_step, after_cancel_step, after_step
          after_cancel_batch, after_batch
        after_cancel_train, after_train
        before_validate
          (the batch events again, without backward and step)
        after_cancel_validate, after_validate
      after_cancel_epoch, after_epoch
    after_cancel_fit, after_fit
"""

from __future__ import annotations

import re
import warnings


class CancelFitException(Exception):
    """Stop training: ``after_cancel_fit`` then ``after_fit`` run."""


class CancelEpochException(Exception):
    """Skip the rest of this epoch (training and validation)."""


class CancelTrainException(Exception):
    """Skip the rest of this epoch's training phase; validation still runs."""


class CancelValidException(Exception):
    """Skip this epoch's validation phase."""


class CancelBatchException(Exception):
    """Skip the rest of this batch (no step, no ``zero_grad``: gradients stay)."""


class CancelStepException(Exception):
    """Skip this optimizer step (``zero_grad`` still runs)."""


class CancelBackwardException(Exception):
    """Skip this backward pass (and the step runs on whatever gradients exist)."""


CANCEL_EXCEPTIONS = (CancelFitException, CancelEpochException, CancelTrainException,
                     CancelValidException, CancelBatchException, CancelStepException,
                     CancelBackwardException)

EVENTS = (
    "after_create",
    "before_fit", "before_epoch", "before_train", "before_batch", "after_pred", "after_loss",
    "before_backward", "after_cancel_backward", "after_backward",
    "before_step", "after_cancel_step", "after_step",
    "after_cancel_batch", "after_batch", "after_cancel_train", "after_train",
    "before_validate", "after_cancel_validate", "after_validate",
    "after_cancel_epoch", "after_epoch", "after_cancel_fit", "after_fit",
)

# Events fired once per batch: a callback with run_train / run_valid False skips them in that phase.
INNER_LOOP = frozenset({
    "before_batch", "after_pred", "after_loss", "before_backward", "after_cancel_backward",
    "after_backward", "before_step", "after_cancel_step", "after_step", "after_cancel_batch",
    "after_batch",
})


def _snake(name: str) -> str:
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()


class Callback:
    """Base class of training-loop callbacks.

    Define methods named after events (``before_fit``, ``after_batch``, ...). ``order`` sorts
    callbacks (lower runs first; ties keep insertion order). Inside a callback, reading an
    attribute it does not have falls through to the learner (``self.model``, ``self.loss``,
    ``self.epoch``); to change the learner, assign on ``self.learn`` (``self.learn.loss = ...``).
    ``run_train`` / ``run_valid`` switch the per-batch events off in that phase; setting
    ``self.run = False`` silences the callback until the end of the current fit.
    """

    order = 0
    run = True
    run_train = True
    run_valid = True

    def __init__(self, **handlers):
        """``Callback(after_batch=fn)``: a one-off callback from functions of no arguments."""
        for event, fn in handlers.items():
            if event not in EVENTS:
                raise ValueError(f"unknown event {event!r}; events are: {', '.join(EVENTS)}")
            self.__dict__[event] = fn

    def handles(self, event: str) -> bool:
        return event in self.__dict__ or getattr(type(self), event, None) is not None

    @property
    def name(self) -> str:
        """Snake-case class name without a ``Callback`` suffix: the learner's attribute for it."""
        cls = type(self).__name__
        if cls.endswith("Callback") and cls != "Callback":
            cls = cls[: -len("Callback")]
        return _snake(cls)

    def __getattr__(self, key: str):
        # Only reached when normal lookup fails: fall through to the learner.
        if key.startswith("_") or key == "learn":
            raise AttributeError(key)
        learn = self.__dict__.get("learn")
        if learn is None:
            raise AttributeError(f"{type(self).__name__} has no attribute {key!r} (and is not "
                                 "attached to a Learner)")
        return getattr(learn, key)

    def __setattr__(self, key: str, value) -> None:
        learn = self.__dict__.get("learn")
        if learn is not None and key not in self.__dict__ and not hasattr(type(self), key) \
                and key in learn.__dict__:
            warnings.warn(f"{type(self).__name__}.{key} = ... sets an attribute of the callback, "
                          f"not of the learner; use self.learn.{key} = ... to change the learner",
                          stacklevel=2)
        super().__setattr__(key, value)

    def __call__(self, event: str):
        """Run this callback's handler for ``event`` (if any), honouring run / run_train / run_valid."""
        attrs = self.__dict__
        if event in INNER_LOOP:  # per-batch events: the cheap checks first
            learn = attrs.get("learn")
            training = getattr(learn, "training", False) if learn is not None else False
            active = (self.run_train and training) or (self.run_valid and not training)
        else:
            active = True
        result = None
        own = attrs.get(event)  # Callback(after_batch=fn): a function of no arguments
        method = getattr(type(self), event, None) if own is None else None
        if self.run and active and (own is not None or method is not None):
            try:
                result = own() if own is not None else method(self)
            except CANCEL_EXCEPTIONS:
                raise
            except Exception as e:
                if hasattr(e, "add_note"):
                    e.add_note(f"(raised in callback {type(self).__name__} at event {event})")
                raise
        if event == "after_fit":
            self.__dict__.pop("run", None)
        return result

    def cleanup(self) -> None:
        """Called once when a fit ends, however it ends (errors included), while the callback is
        still attached; release what the events acquired (files, autocast, live displays).
        Must be safe to call twice."""

    def __repr__(self) -> str:
        return type(self).__name__


class TrainEvalCallback(Callback):
    """Sets train/eval mode and the loop counters (``train_iter``, ``pct_train``, ``epochs_done``).

    Always attached to a ``Learner``; the schedules read ``pct_train``.
    """

    order = -10
    run_valid = False

    def before_fit(self):
        learn = self.learn
        start = getattr(learn, "start_epoch", 0)
        n_iter = len(learn.dls.train) if learn.dls is not None and learn.dls.train is not None else 0
        learn.epoch = start
        learn.train_iter = start * n_iter
        learn.pct_train = start / learn.n_epoch if learn.n_epoch else 0.0
        learn.epochs_done = start

    def before_train(self):
        self.learn.pct_train = self.learn.epoch / self.learn.n_epoch
        self.learn.model.train()
        self.learn.training = True

    def after_batch(self):
        self.learn.pct_train += 1.0 / (self.learn.n_iter * self.learn.n_epoch)
        self.learn.train_iter += 1

    def before_validate(self):
        self.learn.model.eval()
        self.learn.training = False

    def after_epoch(self):
        self.learn.epochs_done = self.learn.epoch + 1


__all__ = [
    "CANCEL_EXCEPTIONS", "EVENTS", "Callback", "CancelBackwardException", "CancelBatchException",
    "CancelEpochException", "CancelFitException", "CancelStepException", "CancelTrainException",
    "CancelValidException", "TrainEvalCallback",
]
