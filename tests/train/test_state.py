"""Training state on disk: save/load round trips, bit-exact resume, atomic writes, export."""

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from mlx_train import (
    Callback,
    CancelFitException,
    DataLoaders,
    EarlyStoppingCallback,
    Learner,
    Metric,
    load_learner,
)

from .helpers import MLP, classification_data, make_dls, make_learner, make_mlp, two_groups


class Losses(Callback):
    """Every training batch's loss, and the stop/save point."""

    order = 70  # after the Recorder has logged the epoch

    def __init__(self, stop_after=None, name="ckpt"):
        self.losses, self.stop_after, self.ckpt = [], stop_after, name

    def after_batch(self):
        if self.learn.training:
            self.losses.append(self.learn.loss.item())

    def after_epoch(self):
        if self.stop_after is not None and self.learn.epoch == self.stop_after - 1:
            self.learn.save(self.ckpt)
            raise CancelFitException()


def _run(tmp_path, seed, loader_seed, fit, stop_after=None, resume=False):
    torch.manual_seed(seed)
    dls = make_dls(bs=12, seed=loader_seed)  # shuffled; own generator or the global RNG
    learn = make_learner(MLP(p=0.3), dls, path=tmp_path, splitter=two_groups)
    rec = Losses(stop_after)
    start = 0
    if resume:
        learn.load("ckpt")
        start = learn.epochs_done
    fit(learn, rec, start)
    return learn, rec.losses


FITS = {
    "fit_one_cycle": lambda learn, rec, start: learn.fit_one_cycle(
        4, slice(1e-3, 1e-2), cbs=rec, start_epoch=start),
    "fit": lambda learn, rec, start: learn.fit(4, 3e-3, cbs=rec, start_epoch=start),
    "fine_tune_frozen": lambda learn, rec, start: (
        learn.freeze() if start == 0 else None,
        learn.fit_one_cycle(4, 1e-2, cbs=rec, start_epoch=start)),
}


@pytest.mark.parametrize("fit,loader_seed", [
    ("fit_one_cycle", None), ("fit_one_cycle", 7), ("fit", None), ("fine_tune_frozen", 7)],
    ids=["one-cycle-global-rng", "one-cycle-loader-generator", "fit-global-rng",
         "frozen-loader-generator"])
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path, loader_seed, fit):
    full, full_losses = _run(tmp_path, 0, loader_seed, FITS[fit])
    _, first = _run(tmp_path, 0, loader_seed, FITS[fit], stop_after=2)
    # a different seed: construction differs, the checkpoint must restore everything
    resumed, second = _run(tmp_path, 123, loader_seed, FITS[fit], resume=True)
    assert first + second == full_losses  # exact float equality, every batch
    for p, q in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert resumed.recorder.values == full.recorder.values  # the history continues
    assert resumed.recorder.losses == full.recorder.losses
    if fit == "fine_tune_frozen":
        assert not resumed.model.body[0].weight.requires_grad  # freezing is part of the state


def test_resume_from_save_model_callback_checkpoints(tmp_path):
    from mlx_train import SaveModelCallback

    def make():
        torch.manual_seed(0)
        return make_learner(MLP(p=0.3), make_dls(bs=24, seed=None), path=tmp_path)

    full = make()
    full.fit_one_cycle(3, 1e-2, cbs=SaveModelCallback(every_epoch=1, with_opt=True, fname="ep"))
    torch.manual_seed(99)
    resumed = make_learner(MLP(p=0.3), make_dls(bs=24, seed=None), path=tmp_path)
    resumed.load("ep_1")
    assert resumed.epochs_done == 2
    resumed.fit_one_cycle(3, 1e-2, start_epoch=resumed.epochs_done)
    for p, q in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_resumed_early_stopping_continues_its_patience(tmp_path):
    class Script(Metric):
        values = [0.5, 0.6, 0.4, 0.3, 0.2, 0.1]

        def reset(self):
            self.epoch = getattr(self, "epoch", -1) + 1

        @property
        def value(self):
            return self.values[self.epoch]

        @property
        def name(self):
            return "score"

    learn = make_learner(metrics=Script(), path=tmp_path)
    learn.fit(6, cbs=[EarlyStoppingCallback("score", patience=2), Losses(stop_after=3)])
    learn = make_learner(metrics=Script(), path=tmp_path)
    learn.load("ckpt")
    learn.metrics[0].epoch = learn.epochs_done - 1
    learn.fit(6, cbs=EarlyStoppingCallback("score", patience=2), start_epoch=learn.epochs_done)
    assert len(learn.recorder.values) == 4  # best at 1; 2 and 3 no better -> stops after epoch 3


def test_file_layout_and_model_only(tmp_path):
    learn = make_learner(path=tmp_path)
    learn.fit(1)
    path = learn.save("state")
    assert path == tmp_path / "models" / "state.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["mlx_train"])
    assert {"model.head.weight", "rng.torch", "rng.numpy", "rng.loader.0"} <= keys
    assert any(k.startswith("opt.") and k.endswith(".exp_avg") for k in keys)
    assert meta["loop"]["epochs_done"] == 1 and meta["opt"]["type"] == "AdamW"
    learn.save("weights", with_opt=False)
    other = make_learner(path=tmp_path)
    other.load("weights", with_opt=False)
    assert torch.equal(other.model.head.weight, learn.model.head.weight) and other.opt is None
    with pytest.raises(ValueError, match="holds the model only"):
        other.load("weights")
    with pytest.raises(ValueError, match="missing keys"):
        make_learner(nn.Sequential(nn.Linear(6, 3)), path=tmp_path).load("weights")
    with pytest.raises(FileNotFoundError):
        learn.load("nope")


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    learn = make_learner(path=tmp_path)
    path = learn.save("s")
    good = path.read_bytes()
    import mlx_train.state as state

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(state, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        learn.save("s")
    assert path.read_bytes() == good
    assert sorted(p.name for p in path.parent.iterdir()) == ["s.safetensors"]


def test_tied_weights_are_saved_once(tmp_path):
    from mlx_core import build_model, get_preset

    model = build_model(get_preset("tiny-qwen2"))  # tie_word_embeddings=True
    ids = torch.randint(0, 128, (4, 8))
    from torch.utils.data import TensorDataset

    dls = DataLoaders.from_dsets(TensorDataset(ids, ids), TensorDataset(ids, ids), bs=2)
    learn = Learner(dls, model, path=tmp_path, progress=False)
    learn.fit(1)
    path = learn.save("tied")
    with safe_open(str(path), "pt") as f:
        assert "model.lm_head.weight" not in f.keys()
    torch.manual_seed(5)
    other = Learner(dls, build_model(get_preset("tiny-qwen2")), path=tmp_path, progress=False)
    other.load("tied")
    assert other.model.lm_head.weight is other.model.model.embed_tokens.weight
    assert torch.equal(other.model.lm_head.weight, model.lm_head.weight)


def test_export_zoo_model_and_load_learner(tmp_path):
    from torch.utils.data import TensorDataset

    from mlx_core import build_model, get_preset

    torch.manual_seed(0)
    ids = torch.randint(0, 128, (8, 10))
    dls = DataLoaders.from_dsets(TensorDataset(ids, ids), TensorDataset(ids[:4], ids[:4]), bs=4)
    learn = Learner(dls, build_model(get_preset("tiny-llama")), path=tmp_path, progress=False)
    learn.fit(1)
    path = learn.export()
    loaded = load_learner(path)
    learn.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), learn.model(ids))
    assert type(loaded.loss_func).__name__ == "CausalLMLoss"
    assert loaded.validate(dls.valid)[0] == pytest.approx(learn.validate()[0], rel=1e-6)


def test_export_with_factory_normalize_and_vocab(tmp_path):
    torch.manual_seed(0)
    dls = DataLoaders.from_dsets(classification_data(64), classification_data(32, seed=1), bs=16,
                                 normalize=True, vocab=["a", "b", "c"])
    learn = Learner(dls, make_mlp(width=8), nn.CrossEntropyLoss(label_smoothing=0.1),
                    path=tmp_path, progress=False)
    learn.fit(1, lr=1e-2)
    factory = f"{make_mlp.__module__}:make_mlp"
    with pytest.raises(ValueError, match="differ from the learner's"):
        learn.export(model_factory=factory, model_kwargs={"width": 9})
    learn.export("clf", model_factory=factory, model_kwargs={"width": 8})
    loaded = load_learner(tmp_path / "clf.safetensors")
    assert loaded.loss_func.label_smoothing == 0.1
    x = classification_data(32, seed=1).tensors[0][5]
    label, dec, probs = loaded.predict(x)
    ref_label, ref_dec, ref_probs = learn.predict(x)
    assert label == ref_label in "abc" and torch.equal(dec, ref_dec)
    assert torch.allclose(probs, ref_probs, atol=1e-7)
    with pytest.raises(ValueError, match="no training data"):
        loaded.fit(1)


def test_export_custom_model_needs_model_on_load(tmp_path):
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 3)

        def forward(self, x):
            return self.lin(x)

    def my_loss(pred, targ):
        return nn.functional.cross_entropy(pred, targ)

    learn = Learner(make_dls(), Custom(), my_loss, path=tmp_path, progress=False)
    learn.export("custom")
    with pytest.raises(ValueError, match="pass model= to load_learner"):
        load_learner(tmp_path / "custom.safetensors")
    loaded = load_learner(tmp_path / "custom.safetensors", model=Custom)
    assert torch.equal(loaded.model.lin.weight, learn.model.lin.weight)
    with pytest.raises(ValueError, match="loaded without its loss"):
        loaded.validate(make_dls().valid)
    assert loaded.predict(torch.zeros(6))[2].shape == (3,)  # no activation known: raw outputs
    with pytest.raises(ValueError, match="holds 'mlx-train-export', expected 'mlx-train-state'"):
        learn.load(tmp_path / "custom.safetensors")
