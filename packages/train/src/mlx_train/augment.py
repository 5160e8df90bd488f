"""On-the-fly image augmentation on whole batches (the callbacks that change inputs while
training, ``MixUp`` and ``ProgressiveResize``, are in ``mlx_train.callback.mixup``).

Augmentations are batch transforms for images ``[N, C, H, W]`` with values in pixel space
(before ``Normalize``), drawn independently per image from the transform's own seeded generator.
Give them to the TRAINING loader only, e.g. ``DataLoaders.from_dsets(..., train_tfms=[...])`` or
``ImageDataLoaders.from_tensors(..., batch_tfms=aug_transforms())``; validation batches are never
augmented. ``Augment`` chains them: the geometric ones (``Flip``, ``Rotate``,
``RandomResizedCrop``) are composed into ONE affine map per image and sampled with one
``grid_sample`` (bilinear, reflection padding), then the pixel ones (``ColourJitter``) run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _new_generator(seed: int | None) -> torch.Generator:
    if seed is None:  # one draw from the global RNG, then independent of it
        seed = int(torch.randint(0, 2**62, (1,)))
    return torch.Generator().manual_seed(seed)


def _check_images(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"image augmentations take float batches [N, C, H, W], got {shape}")
    return x


class AffineAugment:
    """Base of the geometric augmentations: ``matrices(n, h, w, g)`` gives ``[n, 3, 3]`` maps from
    output to input coordinates, in the normalized ``[-1, 1]`` coordinates of ``affine_grid``."""

    size: tuple[int, int] | None = None  # output size, or None to keep the input's

    def matrices(self, n: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


def _chosen(n: int, p: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) < p


class Flip(AffineAugment):
    """Mirror each image left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = _prob(p)

    def matrices(self, n, h, w, g):
        m = torch.eye(3).repeat(n, 1, 1)
        m[_chosen(n, self.p, g), 0, 0] = -1.0
        return m

    def __repr__(self) -> str:
        return f"Flip(p={self.p})"


class Rotate(AffineAugment):
    """Rotate each image, with probability ``p``, by an angle drawn uniformly from
    ``[-max_deg, max_deg]`` degrees (about the centre, in pixel space: right for any aspect)."""

    def __init__(self, max_deg: float = 10.0, p: float = 0.75):
        if max_deg < 0:
            raise ValueError(f"max_deg must be >= 0, got {max_deg}")
        self.max_deg, self.p = float(max_deg), _prob(p)

    def matrices(self, n, h, w, g):
        deg = (torch.rand(n, generator=g) * 2 - 1) * self.max_deg
        deg = torch.where(_chosen(n, self.p, g), deg, torch.zeros(n))
        return rotation_matrices(deg, h, w)

    def __repr__(self) -> str:
        return f"Rotate(max_deg={self.max_deg}, p={self.p})"


def rotation_matrices(degrees: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``[n, 3, 3]`` maps for ``affine_grid`` that rotate images by ``degrees`` counter-clockwise
    as displayed (90 degrees is ``torch.rot90(x, 1, (-2, -1))``), in pixel space, so right for
    any aspect ratio: ``S^-1 R S`` with ``S = diag(w, h)``."""
    t = degrees.double() * math.pi / 180
    cos, sin = torch.cos(t), torch.sin(t)
    m = torch.zeros(len(t), 3, 3, dtype=torch.float64)
    m[:, 0, 0], m[:, 0, 1] = cos, -sin * h / w
    m[:, 1, 0], m[:, 1, 1] = sin * w / h, cos
    m[:, 2, 2] = 1.0
    return m.float()


class RandomResizedCrop(AffineAugment):
    """Crop a random region of each image, covering a fraction ``scale`` of its area with aspect
    ratio in ``ratio`` (both drawn log/uniformly as torchvision does), and resize it to ``size``
    (default: the input's size)."""

    def __init__(self, size: int | Sequence[int] | None = None, scale=(0.35, 1.0),
                 ratio=(3 / 4, 4 / 3)):
        if size is not None:
            size = (size, size) if isinstance(size, int) else tuple(size)
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"size must be an int or (height, width), got {size}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)

    def matrices(self, n, h, w, g):
        area = self.scale[0] + torch.rand(n, generator=g) * (self.scale[1] - self.scale[0])
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(lo + torch.rand(n, generator=g) * (hi - lo))
        # fractions of the width and height; aspect is in pixels: (cw * w) / (ch * h)
        cw = torch.sqrt(area * aspect * h / w).clamp(max=1.0)
        ch = torch.sqrt(area / aspect * w / h).clamp(max=1.0)
        cx = (torch.rand(n, generator=g) * 2 - 1) * (1 - cw)
        cy = (torch.rand(n, generator=g) * 2 - 1) * (1 - ch)
        return crop_matrices(cw, ch, cx, cy)

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


def crop_matrices(cw, ch, cx, cy) -> torch.Tensor:
    """Maps that sample the box of relative width ``cw`` and height ``ch`` centred at ``(cx, cy)``
    (normalized coordinates) onto the whole output."""
    cw = torch.as_tensor(cw, dtype=torch.float32)
    m = torch.zeros(cw.shape[0], 3, 3)
    m[:, 0, 0], m[:, 1, 1], m[:, 2, 2] = cw, torch.as_tensor(ch, dtype=torch.float32), 1.0
    m[:, 0, 2], m[:, 1, 2] = torch.as_tensor(cx, dtype=torch.float32), torch.as_tensor(cy, dtype=torch.float32)
    return m


class ColourJitter:
    """With probability ``p`` per image: multiply brightness by ``1 + U(-b, b)``, scale the
    contrast about the image mean by ``1 + U(-c, c)`` and blend with the grey image by
    ``1 + U(-s, s)`` (saturation; 3-channel images only). Values are clamped to ``[lo, hi]``
    (default ``(0, 1)``, pixel space; ``None`` to keep any value)."""

    def __init__(self, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2,
                 p: float = 0.75, clamp: tuple[float, float] | None = (0.0, 1.0)):
        for name, v in (("brightness", brightness), ("contrast", contrast),
                        ("saturation", saturation)):
            if not 0 <= v < 1:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation
        self.p, self.clamp = _prob(p), clamp

    def factors(self, n: int, g: torch.Generator) -> torch.Tensor:
        """``[n, 3]``: brightness, contrast and saturation factors (1 where not chosen)."""
        spread = torch.tensor([self.brightness, self.contrast, self.saturation])
        f = 1 + (torch.rand(n, 3, generator=g) * 2 - 1) * spread
        return torch.where(_chosen(n, self.p, g)[:, None], f, torch.ones(n, 3))

    def apply(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        f = f.to(x)
        x = x * f[:, 0, None, None, None]
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = mean + (x - mean) * f[:, 1, None, None, None]
        if x.shape[1] == 3:
            grey = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device,
                                     dtype=x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
            x = grey + (x - grey) * f[:, 2, None, None, None]
        return x.clamp(*self.clamp) if self.clamp is not None else x

    def __repr__(self) -> str:
        return (f"ColourJitter(brightness={self.brightness}, contrast={self.contrast}, "
                f"saturation={self.saturation}, p={self.p})")


ColorJitter = ColourJitter


def _prob(p: float) -> float:
    if not 0 <= p <= 1:
        raise ValueError(f"p must be a probability in [0, 1], got {p}")
    return float(p)


class Augment:
    """A batch transform running ``tfms`` on the images (first batch element) with its own
    generator (``seed``): the affine ones composed into one resampling, then the others."""

    def __init__(self, tfms: Sequence, seed: int | None = None, padding_mode: str = "reflection"):
        self.tfms = list(tfms)
        for t in self.tfms:
            if not isinstance(t, (AffineAugment, ColourJitter)):
                raise TypeError(f"not an image augmentation: {t!r} (use Flip, Rotate, "
                                "RandomResizedCrop, ColourJitter)")
        sizes = {t.size for t in self.tfms if isinstance(t, AffineAugment) and t.size is not None}
        if len(sizes) > 1:
            raise ValueError(f"augmentations ask for different output sizes: {sorted(sizes)}")
        self.size = sizes.pop() if sizes else None
        self.padding_mode = padding_mode
        self.generator = _new_generator(seed)

    def __call__(self, batch: tuple) -> tuple:
        return (self.images(batch[0]), *batch[1:])

    def images(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_images(x)
        n, _, h, w = x.shape
        g = self.generator
        affine = None
        for t in self.tfms:
            if isinstance(t, AffineAugment):
                m = t.matrices(n, h, w, g)
                affine = m if affine is None else affine @ m
        size = self.size or (h, w)
        if affine is not None and (tuple(size) != (h, w) or not torch.equal(
                affine, torch.eye(3).expand_as(affine))):  # nothing drawn: no resampling
            grid = F.affine_grid(affine[:, :2].to(x), [n, x.shape[1], *size], align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode=self.padding_mode,
                              align_corners=False)
        for t in self.tfms:
            if isinstance(t, ColourJitter):
                x = t.apply(x, t.factors(n, g))
        return x

    def __repr__(self) -> str:
        return f"Augment({self.tfms})"


def aug_transforms(flip: bool = True, max_rotate: float = 10.0, min_scale: float = 0.35,
                   size: int | Sequence[int] | None = None, brightness: float = 0.2,
                   contrast: float = 0.2, saturation: float = 0.0, p_affine: float = 0.75,
                   p_colour: float = 0.75, seed: int | None = None) -> list[Augment]:
    """fastai-like defaults, as one ``Augment``: flip, rotation, random resized crop (skipped
    when ``min_scale=1`` and no ``size``), colour jitter (skipped when all its amounts are 0).
    Pass ``flip=False`` for data where mirroring changes the label (digits, text)."""
    tfms: list = []
    if flip:
        tfms.append(Flip())
    if max_rotate:
        tfms.append(Rotate(max_rotate, p_affine))
    if min_scale < 1 or size is not None:
        tfms.append(RandomResizedCrop(size, scale=(min_scale, 1.0)))
    if brightness or contrast or saturation:
        tfms.append(ColourJitter(brightness, contrast, saturation, p_colour))
    return [Augment(tfms, seed=seed)] if tfms else []


__all__ = ["AffineAugment", "Augment", "ColorJitter", "ColourJitter", "Flip", "RandomResizedCrop",
           "Rotate", "aug_transforms", "crop_matrices", "rotation_matrices"]
