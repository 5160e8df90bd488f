"""vision_learner on torchvision architectures (torch 2.14.1 + torchvision 0.29.1, the ``vision``
environment): digits at 32x32 through resnet18 to >= 0.95 in 5 epochs, fastai's cut points and
heads for resnet18/34, mobilenet_v3_small/large and efficientnet_b0, fine_tune's freezing
phases, weights files, export / load_learner."""

import pytest
import torch
from torch import nn

from mlx_train import Callback, accuracy, load_learner
from mlx_train.optimizer import even_mults
from mlx_train.vision import AdaptiveConcatPool2d, ImageDataLoaders, vision_learner

pytestmark = pytest.mark.vision

# fastai's cut (model_meta: ResNets cut=-2, the rest before their last pooling child), the
# number of features out of the body, and the layer groups (fastai's _resnet_split: 3).
RESNET_BODY = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
ARCHS = {"resnet18": (RESNET_BODY, 512, 3), "resnet34": (RESNET_BODY, 512, 3),
         "mobilenet_v3_small": (["features"], 576, 2), "mobilenet_v3_large": (["features"], 960, 2),
         "efficientnet_b0": (["features"], 1280, 2)}


def _dls(x, y, n=None, bs=64, **kwargs):
    n = n or len(x)
    return ImageDataLoaders.from_tensors(x[:n], y[:n], valid_pct=0.2, seed=0, bs=bs, **kwargs)


def test_digits_32px_resnet18_reaches_95_percent_in_five_epochs(tvm, digits32):
    dls = _dls(*digits32)
    torch.manual_seed(0)
    learn = vision_learner(dls, tvm.resnet18, pretrained=False, metrics=accuracy, progress=False)
    with learn.no_logging():
        learn.fit_one_cycle(5, 1e-2)
    acc = learn.recorder.values[-1][-1]
    print(f"digits 32x32, resnet18 from scratch, 5 epochs: validation accuracy {acc:.4f}")
    assert acc >= 0.95


@pytest.mark.parametrize("name", list(ARCHS))
def test_arch_body_cut_head_and_groups_as_fastai(tvm, name):
    body_names, nf, n_groups = ARCHS[name]
    builder = getattr(tvm, name)
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8) % 5
    torch.manual_seed(0)
    learn = vision_learner(_dls(x, y, bs=4), builder, pretrained=False, progress=False)
    body, head = learn.model
    full = builder()
    assert [type(c) for c in body.children()] == [type(getattr(full, n)) for n in body_names]
    expected_head = [AdaptiveConcatPool2d, nn.Flatten, nn.BatchNorm1d, nn.Dropout, nn.Linear,
                     nn.ReLU, nn.BatchNorm1d, nn.Dropout, nn.Linear]
    assert [type(m) for m in head] == expected_head
    assert head[2].num_features == 2 * nf and [head[3].p, head[7].p] == [0.25, 0.5]
    assert (head[4].in_features, head[4].out_features, head[8].out_features) == (2 * nf, 512, 5)
    assert head[4].bias is None and head[8].bias is None
    groups = learn.splitter(learn.model)
    assert len(groups) == n_groups and groups[-1] is head
    if n_groups == 3:  # fastai's _resnet_split: stem + layer1-2 | layer3-4 | head
        assert list(groups[0]) == list(body[:6]) and list(groups[1]) == list(body[6:])
    # forward and backward on a small batch: every parameter gets a gradient
    learn.model.train()
    out = learn.model(torch.rand(2, 3, 32, 32))
    nn.functional.cross_entropy(out, torch.tensor([0, 4])).backward()
    assert out.shape == (2, 5)
    assert all(p.grad is not None for p in learn.model.parameters())


def test_custom_head_and_cut(tvm):
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8) % 2
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 2))
    learn = vision_learner(_dls(x, y, bs=4), tvm.resnet18, cut=-3, custom_head=head,
                           progress=False)
    assert learn.model[1] is head and type(learn.model[0][-1]).__name__ == "Sequential"
    assert len(learn.model[0]) == 7  # up to layer3: 256 features
    assert learn.model.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 2)
    assert learn.model_recipe is None  # a custom head: export needs model= or a factory


def test_weights_file_loads_into_the_body_and_freezes_it(tvm, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    ref = tvm.resnet18()
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    save_file(ref.state_dict(), str(tmp_path / "r18.safetensors"))
    expected = [t for k, t in ref.state_dict().items() if not k.startswith("fc.")]
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8) % 2
    for fname in ("r18.pth", "r18.safetensors"):
        learn = vision_learner(_dls(x, y, bs=4), tvm.resnet18, weights=tmp_path / fname,
                               progress=False)
        got = list(learn.model[0].state_dict().values())
        assert len(got) == len(expected)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
        assert not learn.model[0][0].weight.requires_grad  # frozen, as pretrained
        assert learn.model[0][1].weight.requires_grad  # but BatchNorm trains (train_bn)
    # one channel: the file's first conv summed over its input channels (fastai's rule)
    grey = vision_learner(_dls(x[:, :1], y, bs=4), "resnet18", weights=str(tmp_path / "r18.pth"),
                          progress=False)
    assert torch.allclose(grey.model[0][0].weight, ref.conv1.weight.sum(1, keepdim=True))
    torch.save(tvm.mobilenet_v3_small().state_dict(), tmp_path / "mnv3.pth")
    with pytest.raises(ValueError, match="lacks .* is it a state_dict of this architecture"):
        vision_learner(_dls(x, y, bs=4), tvm.resnet18, weights=tmp_path / "mnv3.pth")
    with pytest.raises(FileNotFoundError, match="no weights file"):
        vision_learner(_dls(x, y, bs=4), tvm.resnet18, weights=tmp_path / "nope.pth")


class PhaseRecorder(Callback):
    """Per fit: which parameters train, and the layer groups' lrs at every batch."""

    def __init__(self):
        self.phases = []

    def before_fit(self):
        model = self.learn.model
        self.phases.append({"requires_grad": {n: p.requires_grad
                                              for n, p in model.named_parameters()},
                            "n_groups": self.learn.opt.n_groups,
                            "params": sum(len(g["params"]) for g in self.learn.opt.param_groups),
                            "lrs": [], "before": {n: p.detach().clone()
                                                  for n, p in model.named_parameters()}})

    def after_batch(self):
        if self.learn.training:
            self.phases[-1]["lrs"].append([h["lr"] for h in self.learn.opt.hypers])

    def after_fit(self):
        phase = self.phases[-1]
        phase["changed"] = {n: not torch.equal(phase["before"][n], p.detach())
                            for n, p in self.learn.model.named_parameters()}


def test_fine_tune_freezes_then_unfreezes_the_body_as_fastai(tvm, digits32, tmp_path):
    torch.save(tvm.resnet18().state_dict(), tmp_path / "r18.pth")
    dls = _dls(*digits32, n=80, bs=16)
    rec = PhaseRecorder()
    learn = vision_learner(dls, tvm.resnet18, weights=tmp_path / "r18.pth", cbs=rec,
                           progress=False)
    body = learn.model[0]
    norm = {f"0.{n}" for n, m in body.named_modules() if isinstance(m, nn.BatchNorm2d)
            for n in [f"{n}.weight", f"{n}.bias"]}
    with learn.no_logging():
        learn.fine_tune(1, base_lr=1e-3)
    frozen, unfrozen = rec.phases
    # phase 1: freeze() - the body trains only its BatchNorm layers (train_bn), the head all
    for n, trains in frozen["requires_grad"].items():
        assert trains == (n.startswith("1.") or n in norm), n
        assert frozen["changed"][n] == trains, n
    # lrs: fastai's slice(base_lr) over three groups -> base_lr/10, base_lr/10, base_lr
    assert frozen["n_groups"] == unfrozen["n_groups"] == 3
    assert frozen["params"] == unfrozen["params"] == len(list(learn.model.parameters()))
    for lrs in frozen["lrs"]:
        assert lrs == pytest.approx([lrs[2] / 10, lrs[2] / 10, lrs[2]])
    assert frozen["lrs"][0][2] == pytest.approx(1e-3 / 25)  # 1cycle starts at lr_max / div
    # phase 2: unfreeze() - everything trains, at slice(base_lr/2/100, base_lr/2)
    assert all(unfrozen["requires_grad"].values()) and all(unfrozen["changed"].values())
    ratios = even_mults(5e-6, 5e-4, 3) / 5e-4
    for lrs in unfrozen["lrs"]:
        assert lrs == pytest.approx([r * lrs[2] for r in ratios])
    assert unfrozen["lrs"][0][2] == pytest.approx(5e-4 / 5)  # fine_tune's div=5


def test_export_load_learner_round_trip(tvm, digits32, tmp_path):
    dls = _dls(*digits32, n=120, bs=16)
    torch.manual_seed(0)
    learn = vision_learner(dls, tvm.mobilenet_v3_small, path=tmp_path, progress=False)
    with learn.no_logging():
        learn.fit(1, 1e-3)
    path = learn.export("digits")
    loaded = load_learner(path)  # no model=: the export names how to rebuild it
    assert type(loaded.model[0][0]).__name__ == "Sequential"
    preds, targs = learn.get_preds()
    preds2, targs2 = loaded.get_preds(dl=dls.valid)
    assert torch.equal(preds, preds2) and torch.equal(targs, targs2)
    x = dls.valid.dataset.tensors[0][0]
    assert loaded.predict(x)[0] == learn.predict(x)[0] and loaded.dls.vocab == dls.vocab
