"""The event loop: order of events, what each cancel exception skips, callback plumbing."""

import pytest
import torch

from mlx_train import (
    EVENTS,
    Callback,
    CancelBackwardException,
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    CancelStepException,
    CancelTrainException,
    CancelValidException,
)

from .helpers import make_dls, make_learner

BATCH = ["before_batch", "after_pred", "after_loss", "before_backward", "after_backward",
         "before_step", "after_step", "after_batch"]
VALID_BATCH = ["before_batch", "after_pred", "after_loss", "after_batch"]


class Log(Callback):
    """Records every event it sees (first of all callbacks)."""

    order = -99

    def __init__(self):
        self.events = []


for _e in EVENTS:
    if _e != "after_create":
        setattr(Log, _e, lambda self, _e=_e: self.events.append(_e))


class Raise(Callback):
    order = 98

    def __init__(self, event, exc, when=lambda learn: True):
        self.event, self.exc, self.when = event, exc, when

    def __call__(self, event):
        if event == self.event and self.when(self.learn):
            raise self.exc()


def _learner():
    # bs 48: 96 training items -> 2 batches, 48 validation items -> 1 batch
    return make_learner(dls=make_dls(bs=48))


def expected_epoch(train_batch=BATCH, n_train=2, valid_batch=VALID_BATCH, n_valid=1):
    return (["before_epoch", "before_train"] + train_batch * n_train + ["after_train",
            "before_validate"] + valid_batch * n_valid + ["after_validate", "after_epoch"])


def test_event_order_matches_fastai():
    learn, log = _learner(), Log()
    learn.fit(2, cbs=log)
    assert log.events == ["before_fit", *expected_epoch(), *expected_epoch(), "after_fit"]
    assert log not in learn.cbs and "learn" not in log.__dict__  # cbs= is for that call only


@pytest.mark.parametrize("event,exc,expected", [
    ("before_step", CancelStepException,
     ["before_batch", "after_pred", "after_loss", "before_backward", "after_backward",
      "before_step", "after_cancel_step", "after_step", "after_batch"]),
    ("before_backward", CancelBackwardException,
     ["before_batch", "after_pred", "after_loss", "before_backward", "after_cancel_backward",
      "after_backward", "before_step", "after_step", "after_batch"]),
    ("after_loss", CancelBatchException,
     ["before_batch", "after_pred", "after_loss", "after_cancel_batch", "after_batch"]),
])
def test_batch_level_cancels(event, exc, expected):
    learn, log = _learner(), Log()
    learn.fit(1, cbs=[log, Raise(event, exc, lambda lr: lr.training)])
    first = log.events[log.events.index("before_train") + 1:]
    assert first[: len(expected)] == expected


def test_cancel_step_leaves_weights_and_cancel_batch_keeps_grads():
    learn = _learner()
    before = [p.detach().clone() for p in learn.model.parameters()]
    learn.fit(1, cbs=Raise("before_step", CancelStepException, lambda lr: lr.training))
    assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters(), strict=True))

    class Grads(Callback):
        def before_batch(self):
            if self.learn.training:
                self.seen.append(self.learn.model.head.bias.grad is not None)

    learn, grads = _learner(), Grads()
    grads.seen = []
    learn.fit(1, cbs=[grads, Raise("before_step", CancelBatchException, lambda lr: lr.training)])
    assert grads.seen == [False, True]  # no zero_grad after a cancelled batch


@pytest.mark.parametrize("event,exc,tail", [
    ("before_train", CancelTrainException,
     ["before_epoch", "before_train", "after_cancel_train", "after_train", "before_validate"]),
    ("before_validate", CancelValidException,
     ["before_validate", "after_cancel_validate", "after_validate", "after_epoch"]),
    ("before_epoch", CancelEpochException,
     ["before_epoch", "after_cancel_epoch", "after_epoch", "before_epoch"]),
])
def test_stage_cancels(event, exc, tail):
    learn, log = _learner(), Log()
    learn.fit(2, cbs=[log, Raise(event, exc, lambda lr: lr.epoch == 0)])
    i = log.events.index(tail[0])
    assert log.events[i: i + len(tail)] == tail
    assert log.events[-1] == "after_fit"


def test_cancel_fit_runs_cancel_then_after_fit():
    learn, log = _learner(), Log()
    learn.fit(3, cbs=[log, Raise("after_epoch", CancelFitException, lambda lr: lr.epoch == 1)])
    assert log.events[-3:] == ["after_epoch", "after_cancel_fit", "after_fit"]
    assert log.events.count("before_epoch") == 2
    assert len(learn.recorder.values) == 2


def test_callbacks_sorted_by_order_and_attribute_fall_through():
    seen = []

    class A(Callback):
        order = 5

        def before_fit(self):
            seen.append(("A", self.n_epoch, self.model is self.learn.model))

    class B(Callback):
        order = -20

        def before_fit(self):
            seen.append(("B", self.epoch))

    learn = _learner()
    learn.fit(1, cbs=[A(), B()])
    assert seen == [("B", 0), ("A", 1, True)]
    with pytest.raises(AttributeError, match="no attribute or callback 'nope'"):
        learn.nope  # noqa: B018


def test_setting_a_learner_attribute_on_a_callback_warns():
    class Bad(Callback):
        def before_fit(self):
            self.model = None

    with pytest.warns(UserWarning, match=r"self.learn.model"):
        _learner().fit(1, cbs=Bad())


def test_add_remove_and_context_managers():
    learn = _learner()
    log = Log()
    learn.add_cb(log)
    assert learn.log is log and log.learn is learn
    learn.remove_cb(log)
    assert log not in learn.cbs
    with learn.added_cbs([log]):
        assert learn.cb("log") is log
    assert learn.cb("log") is None
    with learn.removed_cbs(learn.progress):
        assert learn.cb("progress") is None
    assert learn.cb("progress") is not None
    learn.add_cb(Log)  # a class is instantiated
    learn.remove_cb(Log)  # and removing a class removes every instance
    assert not [c for c in learn.cbs if isinstance(c, Log)]


def test_run_train_and_run_valid_and_run_flag():
    counts = {"train": 0, "valid": 0}

    class OnlyValid(Callback):
        run_train = False

        def after_batch(self):
            counts["train" if self.learn.training else "valid"] += 1

    class Silenced(Callback):
        def before_fit(self):
            self.run = False

        def after_batch(self):
            raise AssertionError("a callback with run=False must not run")

    learn = _learner()
    silenced = Silenced()
    learn.fit(2, cbs=[OnlyValid(), silenced])
    assert counts == {"train": 0, "valid": 2}
    assert silenced.run is True  # reset at the end of fit


def test_callback_from_functions():
    seen = []
    learn = _learner()
    learn.fit(1, cbs=Callback(after_epoch=lambda: seen.append(learn.epoch)))
    assert seen == [0]
    with pytest.raises(ValueError, match="unknown event 'after_lunch'"):
        Callback(after_lunch=print)


def test_errors_in_callbacks_name_the_callback_and_cleanup_runs():
    cleaned = []

    class Boom(Callback):
        def after_pred(self):
            raise RuntimeError("boom")

        def cleanup(self):
            cleaned.append(True)

    learn = _learner()
    with pytest.raises(RuntimeError, match="boom") as info:
        learn.fit(1, cbs=Boom())
    assert any("Boom at event after_pred" in n for n in getattr(info.value, "__notes__", []))
    assert cleaned == [True]
    assert learn.in_fit is False


def test_unknown_event_and_show_training_loop(capsys):
    learn = _learner()
    with pytest.raises(ValueError, match="unknown event 'before_lunch'"):
        learn("before_lunch")
    text = learn.show_training_loop()
    assert "before_fit" in text and "Recorder" in text and "TrainEvalCallback" in text


def test_recorder_rows_keep_their_columns_when_phases_are_cancelled():
    from mlx_train import accuracy

    learn = make_learner(dls=make_dls(bs=48), metrics=accuracy)
    learn.fit(4, cbs=[Raise("before_train", CancelTrainException, lambda lr: lr.epoch == 0),
                      Raise("before_validate", CancelValidException, lambda lr: lr.epoch == 1),
                      Raise("after_batch", CancelTrainException,
                            lambda lr: lr.training and lr.epoch == 2),
                      Raise("before_epoch", CancelEpochException, lambda lr: lr.epoch == 3)])
    rows = learn.recorder.values
    assert rows[0][0] is None and None not in rows[0][1:]      # no training batch ran
    assert rows[1][0] is not None and rows[1][1:] == [None, None]
    assert None not in rows[2]                                  # one batch ran: it counts
    assert rows[3] == [None, None, None]
