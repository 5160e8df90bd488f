"""Image augmentations against exact references (flip, rot90, interpolate), MixUp against a
hand-computed mix, ProgressiveResize's schedule."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from mlx_train import Callback, DataLoaders, Learner
from mlx_train.augment import (
    Augment,
    ColourJitter,
    Flip,
    RandomResizedCrop,
    Rotate,
    aug_transforms,
    crop_matrices,
)
from mlx_train.callback.mixup import MixUp, ProgressiveResize


def _images(n=4, c=3, h=6, w=6, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_flip_and_rotations_equal_exact_references():
    x = _images(h=4, w=6)
    assert torch.allclose(Augment([Flip(p=1.0)], seed=0).images(x), x.flip(-1), atol=1e-6)
    assert torch.equal(Augment([Flip(p=0.0)], seed=0).images(x), x)
    sq = _images(h=5, w=5)
    assert torch.allclose(_rotate(sq, 90), torch.rot90(sq, 1, (-2, -1)), atol=1e-5)
    assert torch.allclose(_rotate(sq, -90), torch.rot90(sq, -1, (-2, -1)), atol=1e-5)
    rect = _images(h=4, w=6)  # non-square: 180 degrees is both flips, in pixel space
    assert torch.allclose(_rotate(rect, 180), rect.flip(-1).flip(-2), atol=1e-5)


def _rotate(x, deg):
    from mlx_train.augment import rotation_matrices

    m = rotation_matrices(torch.full((len(x),), float(deg)), x.shape[2], x.shape[3])
    grid = F.affine_grid(m[:, :2], list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def test_rotate_draws_angles_within_range_and_p():
    g = torch.Generator().manual_seed(0)
    m = Rotate(30, p=1.0).matrices(500, 8, 8, g)
    deg = torch.rad2deg(torch.atan2(m[:, 1, 0], m[:, 0, 0]))
    assert deg.abs().max() <= 30 + 1e-4 and deg.abs().max() > 25 and deg.std() > 10
    m = Rotate(30, p=0.0).matrices(10, 8, 8, g)
    assert torch.allclose(m, torch.eye(3).expand(10, 3, 3))


def test_crop_matches_slicing_and_interpolate_of_the_region():
    x = _images(n=1, h=8, w=8)
    # the box of columns 2..5 and rows 0..3 (pixel-aligned), in normalized coordinates
    m = crop_matrices(torch.tensor([0.5]), torch.tensor([0.5]), torch.tensor([0.0]),
                      torch.tensor([-0.5]))
    same = F.grid_sample(x, F.affine_grid(m[:, :2], [1, 3, 4, 4], align_corners=False),
                         align_corners=False)
    assert torch.allclose(same, x[:, :, 0:4, 2:6], atol=1e-6)  # at its own size: the slice
    out = F.grid_sample(x, F.affine_grid(m[:, :2], [1, 3, 8, 8], align_corners=False),
                        align_corners=False)
    ref = F.interpolate(x[:, :, 0:4, 2:6], size=(8, 8), mode="bilinear", align_corners=False)
    # resized: interpolate's, except on the border, where the crop (rightly) blends in the
    # pixels just outside the box and interpolate repeats the box's edge
    assert torch.allclose(out[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-5)
    full = Augment([RandomResizedCrop(scale=(1.0, 1.0), ratio=(1.0, 1.0))], seed=0).images(x)
    assert torch.allclose(full, x, atol=1e-5)  # the whole image is the identity
    small = Augment([RandomResizedCrop(size=(4, 5))], seed=0).images(_images())
    assert small.shape == (4, 3, 4, 5)


def test_random_resized_crop_respects_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    m = RandomResizedCrop(scale=(0.2, 0.6), ratio=(0.5, 2.0)).matrices(2000, 10, 20, g)
    cw, ch, cx, cy = m[:, 0, 0], m[:, 1, 1], m[:, 0, 2], m[:, 1, 2]
    area = cw * ch
    unclamped = (cw < 1) & (ch < 1)
    assert area[unclamped].min() >= 0.2 - 1e-5 and area.max() <= 0.6 + 1e-5
    aspect = (cw * 20) / (ch * 10)
    assert aspect[unclamped].min() >= 0.5 - 1e-4 and aspect[unclamped].max() <= 2.0 + 1e-4
    assert ((cx.abs() + cw) <= 1 + 1e-5).all() and ((cy.abs() + ch) <= 1 + 1e-5).all()


def test_colour_jitter_follows_its_formula():
    x = _images(n=3)
    jitter = ColourJitter(brightness=0.3, contrast=0.4, saturation=0.5, p=1.0, clamp=None)
    f = jitter.factors(3, torch.Generator().manual_seed(1))
    assert ((f - 1).abs() <= torch.tensor([0.3, 0.4, 0.5])).all()
    out = jitter.apply(x, f)
    ref = []
    for i in range(3):
        b, c, s = f[i].tolist()
        y = x[i] * b
        y = y.mean() + (y - y.mean()) * c
        grey = 0.299 * y[0] + 0.587 * y[1] + 0.114 * y[2]
        ref.append(grey + (y - grey) * s)
    assert torch.allclose(out, torch.stack(ref), atol=1e-5)
    assert ColourJitter(p=1.0).apply(x, torch.full((3, 3), 3.0)).max() <= 1.0  # clamped
    assert torch.equal(ColourJitter(p=0.0).factors(4, torch.Generator()), torch.ones(4, 3))


def test_augment_is_seeded_and_validates():
    x = _images(n=8)
    a, b = Augment([Flip(), Rotate(20), ColourJitter()], seed=3), Augment([Flip(), Rotate(20),
                                                                          ColourJitter()], seed=3)
    assert torch.equal(a.images(x), b.images(x))
    assert not torch.equal(a.images(x), Augment([Flip(), Rotate(20)], seed=4).images(x))
    with pytest.raises(TypeError, match="not an image augmentation"):
        Augment([lambda x: x])
    with pytest.raises(ValueError, match="different output sizes"):
        Augment([RandomResizedCrop(4), RandomResizedCrop(5)])
    with pytest.raises(ValueError, match=r"float batches \[N, C, H, W\]"):
        a.images(torch.zeros(2, 3, 4, dtype=torch.float32))
    with pytest.raises(ValueError, match="p must be a probability"):
        Flip(p=2)
    assert len(aug_transforms(flip=False, max_rotate=0, min_scale=1.0, brightness=0,
                              contrast=0)) == 0


def test_training_batches_only_are_augmented_and_one_batch_is_not():
    x, y = _images(n=32), torch.arange(32)
    aug = Augment([Flip(p=1.0)], seed=0)
    dls = DataLoaders.from_dsets(TensorDataset(x[:16], y[:16]), TensorDataset(x[16:], y[16:]),
                                 bs=8, shuffle=False, train_tfms=[aug])
    xb, yb = next(iter(dls.train))
    assert torch.allclose(xb, x[:8].flip(-1), atol=1e-6)
    assert torch.equal(next(iter(dls.valid))[0], x[16:24])  # validation: never augmented
    state = aug.generator.get_state()
    assert torch.equal(dls.one_batch()[0], x[:8])  # one_batch: dataset order, no augmentation
    assert torch.equal(aug.generator.get_state(), state)
    assert aug.generator in dls.train.generators  # saved with the training state


def test_augmented_training_resumes_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(48, 1, 6, 6, generator=g), torch.randint(0, 2, (48,), generator=g)

    def make():
        torch.manual_seed(0)
        dls = DataLoaders.from_dsets(TensorDataset(x[:32], y[:32]), TensorDataset(x[32:], y[32:]),
                                     bs=8, seed=1, train_tfms=aug_transforms(seed=2))
        net = nn.Sequential(nn.Flatten(), nn.Linear(36, 2))
        return Learner(dls, net, nn.CrossEntropyLoss(), path=tmp_path, progress=False)

    full = make()
    with full.no_logging():
        full.fit(3, 1e-2)
    part = make()
    with part.no_logging():
        part.fit(3, 1e-2, cbs=Callback(after_epoch=lambda: part.save("ck") if part.epoch == 0
                                       else None))
    resumed = make().load("ck")
    with resumed.no_logging():
        resumed.fit(3, 1e-2, start_epoch=resumed.epochs_done)
    assert resumed.recorder.raw_losses == full.recorder.raw_losses


class _Record(Callback):
    order = 30

    def before_fit(self):
        self.xs, self.losses, self.valid_x = [], [], []

    def after_loss(self):
        if self.training:
            self.xs.append(self.xb[0].clone())
            self.losses.append(self.loss.item())
        else:
            self.valid_x.append(self.xb[0].clone())


def test_mixup_mixes_inputs_and_losses_as_computed_by_hand():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
    dls = DataLoaders.from_dsets(TensorDataset(x, y), TensorDataset(x[:8], y[:8]), bs=8,
                                 shuffle=False)
    torch.manual_seed(0)
    net = nn.Linear(5, 3)
    rec = _Record()
    learn = Learner(dls, net, nn.CrossEntropyLoss(), lr=0.0, progress=False,
                    cbs=[MixUp(alpha=0.4, seed=7), rec])
    with learn.no_logging():
        learn.fit(1, lr=0.0)  # lr 0: the weights stay, so the losses can be recomputed
    rng = np.random.default_rng(7)
    for i in range(2):
        lam = float(rng.beta(0.4, 0.4))
        lam = max(lam, 1 - lam)
        perm = torch.from_numpy(rng.permutation(8))
        xb, yb = x[8 * i:8 * i + 8], y[8 * i:8 * i + 8]
        mixed = lam * xb + (1 - lam) * xb[perm]
        assert torch.allclose(rec.xs[i], mixed, atol=1e-6)
        with torch.no_grad():
            pred = net(mixed)
        ref = lam * F.cross_entropy(pred, yb) + (1 - lam) * F.cross_entropy(pred, yb[perm])
        assert rec.losses[i] == pytest.approx(ref.item(), abs=1e-6)
    assert torch.equal(rec.valid_x[0], x[:8])  # validation is not mixed
    with pytest.raises(ValueError, match="alpha must be positive"):
        MixUp(alpha=0)


def test_progressive_resize_schedule_and_sizes_seen():
    prog = ProgressiveResize(start=0.5, pct=0.5, step=2)
    assert prog.size_at(0.0, (16, 16)) == (8, 8)
    assert prog.size_at(0.25, (16, 16)) == (12, 12)   # halfway: 0.75 * 16
    assert prog.size_at(0.2, (16, 16)) == (10, 10)    # 0.7 * 16 = 11.2, down to a multiple of 2
    assert prog.size_at(0.5, (16, 16)) == (16, 16) == prog.size_at(0.9, (16, 16))
    assert ProgressiveResize(start=4, pct=1.0).size_at(0.0, (16, 8)) == (4, 2)  # pixels of the long side

    x, y = torch.rand(32, 1, 16, 16), torch.randint(0, 2, (32,))
    dls = DataLoaders.from_dsets(TensorDataset(x, y), TensorDataset(x[:8], y[:8]), bs=8, seed=0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 2))
    rec, prog = _Record(), ProgressiveResize(start=0.5, pct=1.0, step=2)
    learn = Learner(dls, net, nn.CrossEntropyLoss(), progress=False, cbs=[prog, rec])
    with learn.no_logging():
        learn.fit(2)
    seen = [tuple(t.shape[-2:]) for t in rec.xs]
    expected = [prog.size_at(i / 8, (16, 16)) for i in range(8)]
    assert seen == expected == prog.sizes and seen[0] == (8, 8) and seen[-1] == (14, 14)
    # validation at the size reached: after epoch 0 (pct 0.5) 0.75 * 16, after epoch 1 full
    assert [tuple(t.shape[-2:]) for t in rec.valid_x] == [(12, 12), (16, 16)]
    resized = F.interpolate(x[:8], size=(12, 12), mode="bilinear", align_corners=False,
                            antialias=True)
    assert torch.allclose(rec.valid_x[0], resized)
    with pytest.raises(ValueError, match="start must be"):
        ProgressiveResize(start=1.5)
