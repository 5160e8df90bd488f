"""Image data and vision_learner: scikit-learn's 8x8 digits to >= 0.97 in 5 epochs, bodies cut
from a torchvision-style network, freezing and discriminative lrs, show_batch, from_folder.
Real torchvision and timm architectures are tested in tests/train/vision (marker ``vision``,
run in the environment of requirements-vision.txt)."""

import numpy as np
import pytest
import torch
from torch import nn

from mlx_train import accuracy
from mlx_train.augment import aug_transforms
from mlx_train.data import Normalize
from mlx_train.vision import (
    ImageDataLoaders,
    create_body,
    create_head,
    num_features,
    simple_cnn,
    vision_learner,
)


def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    return datasets.load_digits()


def test_digits_reach_97_percent_in_five_epochs():
    d = _digits()
    dls = ImageDataLoaders.from_tensors(d.images, d.target, scale=16.0, valid_pct=0.2, seed=0,
                                        bs=32)
    torch.manual_seed(0)
    learn = vision_learner(dls, "simple_cnn", metrics=accuracy, progress=False)
    with learn.no_logging():
        learn.fit_one_cycle(5, 5e-3)
    acc = learn.recorder.values[-1][-1]
    print(f"digits validation accuracy after 5 epochs: {acc:.4f}")
    assert acc >= 0.97
    # predict one image: label names from the vocab, probabilities sum to one
    label, idx, probs = learn.predict(dls.valid.dataset.tensors[0][0])
    assert label == str(int(idx)) and abs(float(probs.sum()) - 1) < 1e-5


def test_normalisation_uses_the_training_split_for_every_split():
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(40, 3, 4, 4, generator=g) * 255).to(torch.uint8)
    labels = ["cat", "dog"] * 20
    splits = (list(range(30)), list(range(30, 40)))
    dls = ImageDataLoaders.from_tensors(images, labels, splits=splits, bs=10)
    assert dls.vocab == ["cat", "dog"]
    norm = next(t for t in dls.after_batch if isinstance(t, Normalize))
    train = images[:30].double() / 255
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), unbiased=False, keepdim=True) + 1e-7
    assert torch.allclose(norm.mean.double(), mean, atol=1e-6)
    assert torch.allclose(norm.std.double(), std, atol=1e-6)
    xb, yb = next(iter(dls.valid))  # validation normalized with the TRAINING statistics
    assert torch.allclose(xb.double(), (images[30:].double() / 255 - mean) / std, atol=1e-5)
    assert yb.tolist() == [0, 1] * 5


def test_show_batch_writes_a_png_grid(tmp_path):
    pytest.importorskip("matplotlib")
    x = torch.rand(12, 1, 8, 8)
    dls = ImageDataLoaders.from_tensors(x, torch.arange(12) % 3, valid_pct=0.25, seed=0, bs=8,
                                        batch_tfms=aug_transforms(seed=0), vocab=["a", "b", "c"])
    gen = dls.train_tfms[0].generator.get_state()
    path = dls.show_batch(max_n=6, fname=tmp_path / "batch.png")
    aug_path = dls.show_batch(max_n=4, fname=tmp_path / "aug.png", augmented=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and aug_path.stat().st_size > 1000
    assert torch.equal(dls.train_tfms[0].generator.get_state(), gen)  # draws nothing


class TinyResNet(nn.Module):
    """The layout torchvision's ResNets have: conv1, bn1, relu, maxpool, layer1..4, avgpool, fc."""

    def __init__(self, pretrained=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1, self.relu, self.maxpool = nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)
        self.layer1, self.layer2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.layer3, self.layer4 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 24, 3, padding=1)
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(24, 1000)
        self.pretrained = pretrained

    def forward(self, x):
        for m in list(self.children())[:-1]:
            x = m(x)
        return self.fc(x.flatten(1))


def test_body_cut_first_conv_adapted_and_pretrained_weights_summed():
    net = TinyResNet()
    body = create_body(net, n_in=1, pretrained=True)
    assert len(body) == 8 and isinstance(body[-1], nn.Conv2d)  # everything before avgpool
    assert body[0].in_channels == 1
    assert torch.allclose(body[0].weight, net.conv1.weight.sum(1, keepdim=True))
    body5 = create_body(TinyResNet(), n_in=5, pretrained=True)
    assert body5[0].weight.shape[1] == 5
    assert num_features(body, 1) == 24
    with pytest.raises(ValueError, match="no pooling layer"):
        create_body(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    head = create_head(24, 7, lin_ftrs=[16], ps=0.4)
    drops = [m.p for m in head if isinstance(m, nn.Dropout)]
    assert drops == [0.2, 0.4] and head(torch.randn(3, 24, 2, 2)).shape == (3, 7)


def test_vision_learner_groups_freezing_and_discriminative_lrs():
    x, y = torch.rand(32, 1, 8, 8), torch.arange(32) % 4
    dls = ImageDataLoaders.from_tensors(x, y, valid_pct=0.25, seed=0, bs=8)
    learn = vision_learner(dls, TinyResNet, pretrained=True, progress=False)  # a callable arch
    assert learn.model[0][0].in_channels == 1 and learn.model[1][-1].out_features == 4
    groups = learn.splitter(learn.model)
    assert len(groups) == 2 and groups[0] is learn.model[0]
    body = learn.model[0]
    frozen = [p.requires_grad for m in body.modules() if isinstance(m, nn.Conv2d)
              for p in m.parameters()]
    assert not any(frozen)  # pretrained: the body starts frozen ...
    assert all(p.requires_grad for p in body[1].parameters())  # ... but BatchNorm trains
    before = [p.detach().clone() for p in body[0].parameters()]
    with learn.no_logging():
        learn.fit(1, lr=slice(1e-4, 1e-2))
    assert all(torch.equal(a, b) for a, b in zip(before, body[0].parameters(), strict=True))
    assert [h["lr"] for h in learn.opt.hypers] == pytest.approx([1e-4, 1e-2])
    learn.unfreeze()
    with learn.no_logging():
        learn.fit(1, lr=slice(1e-4, 1e-2))
    assert not torch.equal(before[0], body[0].weight)
    scratch = vision_learner(dls, "simple_cnn", progress=False)  # not pretrained: all train
    assert all(p.requires_grad for p in scratch.model.parameters())
    assert isinstance(scratch.model[0], nn.Sequential) and scratch.model[0][0][0].in_channels == 1
    with pytest.raises(ValueError, match="no pretrained weights"):
        vision_learner(dls, "simple_cnn", pretrained=True)
    with pytest.raises(TypeError, match="arch must be"):
        vision_learner(dls, 3)


def test_unknown_arch_names_the_choices(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    dls = ImageDataLoaders.from_tensors(torch.rand(8, 3, 8, 8), torch.arange(8) % 2, seed=0)
    with pytest.raises(ImportError, match="pip install torchvision"):
        vision_learner(dls, "resnet18")


def test_from_folder_reads_class_subfolders(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("valid", 2)):
        for cls in ("ants", "bees"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
                Image.fromarray(a).save(tmp_path / split / cls / f"{i}.png")
    dls = ImageDataLoaders.from_folder(tmp_path, size=8, bs=4, seed=0)
    assert dls.vocab == ["ants", "bees"] and len(dls.train.dataset) == 12
    assert len(dls.valid.dataset) == 4 and dls.one_batch()[0].shape == (4, 3, 8, 8)
    grey = ImageDataLoaders.from_folder(tmp_path, mode="L", bs=4)
    assert grey.one_batch()[0].shape == (4, 1, 10, 12)
    with pytest.raises(ValueError, match="no images"):
        ImageDataLoaders.from_folder(tmp_path / "train" / "ants")


def test_image_input_errors():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\] or \[N, H, W\]"):
        ImageDataLoaders.from_tensors(torch.rand(4, 8), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        ImageDataLoaders.from_tensors(torch.rand(4, 8, 8), [0, 1, 0])
    with pytest.raises(ValueError, match="labels not in vocab"):
        ImageDataLoaders.from_tensors(torch.rand(4, 8, 8), ["a", "b", "a", "c"], vocab=["a", "b"])
    assert simple_cnn(2, (4, 8))(torch.rand(1, 2, 8, 8)).shape == (1, 8, 4, 4)
