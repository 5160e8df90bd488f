"""Exact resumption with callbacks and augmentations that own random state (MixUp, CutMix, an
image augmentation pipeline, custom ones): a run stopped after k epochs, saved, loaded into a
fresh learner and continued reproduces the uninterrupted run's losses bit for bit; a file and a
learner that disagree about those callbacks raise (or warn with strict=False)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from torch.utils.data import TensorDataset

from mlx_train import Callback, CancelFitException, DataLoaders, Learner, aug_transforms
from mlx_train.callback.mixup import CutMix, MixUp

G = torch.Generator().manual_seed(0)
X, Y = torch.rand(48, 3, 8, 8, generator=G), torch.randint(0, 3, (48,), generator=G)


def tiny_cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


class Noise(Callback):
    """Adds noise to the inputs from its OWN torch generator: state as a tensor."""

    order = 25
    run_valid = False

    def __init__(self, seed=None):
        self.g = torch.Generator().manual_seed(seed if seed is not None else
                                               int(torch.randint(0, 2**62, (1,))))

    def before_batch(self):
        x = self.learn.xb[0]
        self.learn.xb = (x + 0.1 * torch.randn(x.shape, generator=self.g), *self.learn.xb[1:])

    def state_dict(self):
        return {"generator": self.g.get_state()}

    def load_state_dict(self, state):
        self.g.set_state(state["generator"])


class GlobalNoise(Callback):
    """Draws from torch's GLOBAL RNG: no state of its own, covered by the saved rng.torch."""

    order = 25
    run_valid = False

    def before_batch(self):
        x = self.learn.xb[0]
        self.learn.xb = (x + 0.1 * torch.randn_like(x), *self.learn.xb[1:])


class NumpyShift:
    """A (toy) training batch transform with a numpy generator: state as JSON."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def __call__(self, batch):
        return (batch[0] + float(self.rng.normal()), *batch[1:])

    def state_dict(self):
        return {"rng": {k: str(v) for k, v in self.rng.bit_generator.state["state"].items()}}

    def load_state_dict(self, state):
        st = self.rng.bit_generator.state
        st["state"] = {k: int(v) for k, v in state["rng"].items()}
        self.rng.bit_generator.state = st


class Stop(Callback):
    order = 70  # after the Recorder has logged the epoch

    def __init__(self, after):
        self.after = after

    def after_epoch(self):
        if self.epoch == self.after - 1:
            self.learn.save("ckpt")
            raise CancelFitException()


def make(tmp_path, torch_seed, cbs=(), train_tfms=(), loader_seed=1):
    torch.manual_seed(torch_seed)  # before the callbacks: an unseeded one draws its seed here
    cbs, train_tfms = [c() for c in cbs], [t() for t in train_tfms]
    dls = DataLoaders.from_dsets(TensorDataset(X[:32], Y[:32]), TensorDataset(X[32:], Y[32:]),
                                 bs=8, seed=loader_seed, train_tfms=train_tfms)
    return Learner(dls, tiny_cnn(), nn.CrossEntropyLoss(), path=tmp_path, progress=False, cbs=cbs)


def run(learn, stop_after=None, start_epoch=0):
    with learn.no_logging():
        learn.fit_one_cycle(3, 1e-2, cbs=Stop(stop_after) if stop_after else None,
                            start_epoch=start_epoch)
    return learn


def resumed_equals_uninterrupted(tmp_path, cbs=(), train_tfms=(), loader_seed=1, stop_after=1):
    full = run(make(tmp_path, 0, cbs, train_tfms, loader_seed))
    run(make(tmp_path, 0, cbs, train_tfms, loader_seed), stop_after=stop_after)
    # another seed: the fresh learner's weights, and the unseeded callbacks' and augmentations'
    # generators, all differ until load puts the saved state back
    resumed = make(tmp_path, 123, cbs, train_tfms, loader_seed).load("ckpt")
    run(resumed, start_epoch=resumed.epochs_done)
    assert len(full.recorder.raw_losses) == 12
    # bit for bit: exact float equality of every training batch's loss, and of the weights
    assert resumed.recorder.raw_losses == full.recorder.raw_losses
    assert all(torch.equal(p, q) for p, q in zip(full.model.parameters(),
                                                 resumed.model.parameters(), strict=True))


def AUG():  # flip, rotate, random resized crop, colour jitter: one seeded Augment
    return aug_transforms(max_rotate=20, min_scale=0.5, brightness=0.3, contrast=0.3,
                          saturation=0.3, seed=5)[0]


def AUG_UNSEEDED():
    return aug_transforms(max_rotate=20, min_scale=0.5, saturation=0.3)[0]

CASES = {
    "mixup": dict(cbs=[lambda: MixUp(0.4, seed=3)]),
    "mixup-unseeded": dict(cbs=[MixUp]),
    "cutmix": dict(cbs=[lambda: CutMix(1.0, seed=3)]),
    "cutmix-unseeded-global-shuffle": dict(cbs=[CutMix], loader_seed=None),
    "augment": dict(train_tfms=[AUG]),
    "augment-unseeded-global-shuffle": dict(train_tfms=[AUG_UNSEEDED], loader_seed=None),
    "augment+mixup+cutmix": dict(cbs=[lambda: MixUp(seed=3), lambda: CutMix(seed=4)],
                                 train_tfms=[AUG], stop_after=2),
    "two-of-one-class": dict(cbs=[lambda: Noise(1), lambda: Noise(2)]),
    "numpy-train-tfm": dict(train_tfms=[lambda: NumpyShift(7)]),
    "global-rng-callback": dict(cbs=[GlobalNoise], loader_seed=None),
}


@pytest.mark.parametrize("case", CASES)
def test_resume_with_random_callbacks_and_augmentations_is_bit_exact(tmp_path, case):
    resumed_equals_uninterrupted(tmp_path, **CASES[case])


def test_the_state_file_holds_each_callbacks_state_by_name_and_position(tmp_path):
    learn = make(tmp_path, 0, [lambda: MixUp(seed=3), lambda: Noise(1), lambda: Noise(2)],
                 [lambda: NumpyShift(7)])
    run(learn, stop_after=1)
    with safe_open(str(tmp_path / "models" / "ckpt.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), json.loads(f.metadata()["mlx_train"])
        noise0 = f.get_tensor("cb.noise.0.generator")
    assert {"cb.noise.0.generator", "cb.noise.1.generator"} <= keys
    first_noise = next(c for c in learn.cbs if isinstance(c, Noise))
    assert torch.equal(noise0, first_noise.g.get_state())  # the generator's state, as saved
    cbs = meta["callbacks"]
    assert sorted(cbs) == ["mix_up", "noise.0", "noise.1"]
    assert cbs["mix_up"] == {"class": "MixUp", "tensors": [],
                             "values": json.loads(json.dumps(learn.cb("mix_up").state_dict()))}
    assert meta["train_tfms"] == {"0": {"class": "NumpyShift", "tensors": [],
                                        "values": learn.dls.train.aug[0].state_dict()}}
    assert "recorder" not in cbs  # the Recorder is saved on its own, as before


def test_a_callback_missing_from_the_learner_or_the_file_raises_unless_not_strict(tmp_path):
    run(make(tmp_path, 0, [lambda: MixUp(seed=3)]), stop_after=1)
    bare = make(tmp_path, 0)
    with pytest.raises(ValueError, match=r"mix_up \(MixUp\).*add_cb.*strict=False") as e:
        bare.load("ckpt")
    assert "fit(cbs=...)" in str(e.value)
    assert bare.epochs_done == 0  # nothing was half-loaded before the error
    with pytest.warns(UserWarning, match=r"mix_up \(MixUp\)"):
        bare.load("ckpt", strict=False)
    assert bare.epochs_done == 1
    make(tmp_path, 0).load("ckpt", resume=False)  # no RNG state restored: nothing to match

    run(make(tmp_path, 0), stop_after=1)  # saved without MixUp
    mixing = make(tmp_path, 0, [lambda: MixUp(seed=3), lambda: CutMix(seed=4)])
    with pytest.raises(ValueError, match=r"cut_mix \(CutMix\), mix_up \(MixUp\).*does not hold"
                       r".*strict=False"):
        mixing.load("ckpt")
    state = mixing.cb("mix_up").state_dict()
    with pytest.warns(UserWarning, match="cut_mix"):
        mixing.load("ckpt", strict=False)
    assert mixing.cb("mix_up").state_dict() == state  # kept its own state

    run(make(tmp_path, 0, train_tfms=[lambda: NumpyShift(7)]), stop_after=1)
    with pytest.raises(ValueError, match=r"training batch transform 0 \(NumpyShift\)"):
        make(tmp_path, 0).load("ckpt")


def test_a_state_that_is_neither_tensors_nor_json_is_refused_on_save(tmp_path):
    class Odd(Callback):
        def state_dict(self):
            return {"rng": np.random.default_rng(0)}

        def load_state_dict(self, state):
            pass

    learn = make(tmp_path, 0, [Odd])
    with pytest.raises(TypeError, match=r"Odd.state_dict\(\)\['rng'\].*Generator.*tensors or JSON"):
        learn.save("x")
    assert not (tmp_path / "models" / "x.safetensors").exists()


def test_cutmix_pastes_a_box_and_mixes_the_loss_by_its_area():
    class Record(Callback):
        order = 30

        def after_loss(self):
            if self.training:
                self.x, self.loss_ = self.xb[0].clone(), self.loss.item()

    x, y = X[:8], Y[:8]
    dls = DataLoaders.from_dsets(TensorDataset(x, y), TensorDataset(x, y), bs=8, shuffle=False)
    torch.manual_seed(0)
    net, rec = tiny_cnn(), Record()
    learn = Learner(dls, net, nn.CrossEntropyLoss(), progress=False,
                    cbs=[CutMix(1.0, seed=11), rec])
    net[2].p = 0.0  # no dropout: the loss can be recomputed
    with learn.no_logging():
        learn.fit(1, lr=0.0)
    rng = np.random.default_rng(11)
    lam = float(rng.beta(1.0, 1.0))
    perm = torch.from_numpy(rng.permutation(8))
    cut = np.sqrt(1 - lam)
    ch, cw = int(8 * cut), int(8 * cut)
    cy, cx = int(rng.integers(8)), int(rng.integers(8))
    t, b = max(cy - ch // 2, 0), min(cy + ch // 2, 8)
    left, r = max(cx - cw // 2, 0), min(cx + cw // 2, 8)
    ref = x.clone()
    ref[:, :, t:b, left:r] = x[perm][:, :, t:b, left:r]
    assert (b - t) * (r - left) > 0 and torch.equal(rec.x, ref)
    kept = 1 - (b - t) * (r - left) / 64
    with torch.no_grad():
        pred = net(ref)
    expected = kept * F.cross_entropy(pred, y) + (1 - kept) * F.cross_entropy(pred, y[perm])
    assert rec.loss_ == pytest.approx(expected.item(), abs=1e-6)
    flat = DataLoaders.from_dsets(TensorDataset(torch.randn(8, 5), y), TensorDataset(
        torch.randn(8, 5), y), bs=8)
    with pytest.raises(ValueError, match="image augmentations take float batches"):
        Learner(flat, nn.Linear(5, 3), nn.CrossEntropyLoss(), progress=False,
                cbs=CutMix(seed=0)).fit(1)
