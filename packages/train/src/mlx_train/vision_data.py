"""Image data: ``ImageDataLoaders`` (from tensors / arrays, or a folder of class sub-folders) with
training-split normalisation, training-only augmentation and ``show_batch`` (a PNG grid)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from mlx_train.data import DataLoaders, Normalize, RandomSplitter, StratifiedSplitter
from mlx_train.plotting import new_figure

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def as_images(images, scale: float | None = None) -> torch.Tensor:
    """Float images ``[N, C, H, W]`` from a tensor or array ``[N, C, H, W]`` or ``[N, H, W]``
    (one channel). ``uint8`` data is divided by 255; pass ``scale`` to divide by something else
    (e.g. 16 for scikit-learn's digits)."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W] or [N, H, W], got shape {tuple(x.shape)}")
    if scale is None:
        scale = 255.0 if x.dtype == torch.uint8 else 1.0
    return x.float() / scale


def encode_labels(labels, vocab: Sequence | None = None) -> tuple[torch.Tensor, list | None]:
    """Class indices ``[N]`` and the vocab: integer labels are indices already (checked against
    ``vocab`` when given); other labels (names) are looked up in ``vocab`` (default: the sorted
    distinct labels)."""
    values = labels.tolist() if isinstance(labels, (torch.Tensor, np.ndarray)) else list(labels)
    if values and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        y = torch.tensor(values, dtype=torch.long)
        if vocab is not None and (y.min() < 0 or y.max() >= len(vocab)):
            raise ValueError(f"integer labels must index vocab (0..{len(vocab) - 1}), got "
                             f"{int(y.min())}..{int(y.max())}")
        if y.min() < 0:
            raise ValueError("integer labels must be class indices >= 0")
        return y, list(vocab) if vocab is not None else None
    vocab = list(vocab) if vocab is not None else sorted(set(values), key=str)
    index = {v: i for i, v in enumerate(vocab)}
    missing = sorted({str(v) for v in values if v not in index})
    if missing:
        raise ValueError(f"labels not in vocab: {missing[:5]}")
    return torch.tensor([index[v] for v in values], dtype=torch.long), vocab


class ImageDataLoaders(DataLoaders):
    """``DataLoaders`` of ``(images [N, C, H, W], labels)`` batches, with ``show_batch``."""

    @classmethod
    def from_tensors(cls, images, labels, *, valid_pct: float = 0.2, seed: int | None = None,
                     splits: tuple[Sequence[int], Sequence[int]] | None = None,
                     stratify: bool = False, bs: int = 64, val_bs: int | None = None,
                     scale: float | None = None, normalize: bool = True,
                     batch_tfms: Sequence[Callable] = (), vocab: Sequence | None = None,
                     **kwargs) -> ImageDataLoaders:
        """Split ``images`` / ``labels`` (``splits=(train_idx, valid_idx)``, or ``valid_pct`` at
        random with ``seed``, per class with ``stratify``); ``normalize`` adds per-channel
        statistics of the TRAINING split; ``batch_tfms`` (e.g. ``aug_transforms()``) augment
        training batches only. Labels may be ints or names (``vocab`` = the sorted names)."""
        x = as_images(images, scale)
        y, found_vocab = encode_labels(labels, vocab)
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        if splits is None:
            splitter = StratifiedSplitter(valid_pct, seed) if stratify else RandomSplitter(valid_pct, seed)
            splits = splitter(y.tolist()) if stratify else splitter(len(y))
        train_idx, valid_idx = (torch.as_tensor(list(s), dtype=torch.long) for s in splits)
        train = TensorDataset(x[train_idx], y[train_idx])
        valid = TensorDataset(x[valid_idx], y[valid_idx]) if len(valid_idx) else None
        vocab = found_vocab if found_vocab is not None else vocab
        if vocab is None:
            vocab = [str(i) for i in range(int(y.max()) + 1)] if len(y) else None
        return cls.from_dsets(train, valid, bs, val_bs=val_bs, seed=seed,
                              normalize=(0, 2, 3) if normalize else False, vocab=vocab,
                              train_tfms=batch_tfms, **kwargs)

    from_arrays = from_tensors

    @classmethod
    def from_folder(cls, path: str | Path, *, train: str = "train", valid: str = "valid",
                    size: int | tuple[int, int] | None = None, mode: str = "RGB",
                    **kwargs) -> ImageDataLoaders:
        """Images in ``path/train/<class>/*.png`` and ``path/valid/<class>/*.png`` (or, without
        a ``valid`` folder, every ``path/<class>/*`` split by ``valid_pct``). ``size`` resizes
        every image (needed when they differ); ``mode``: PIL's ``"RGB"`` or ``"L"`` (grey)."""
        try:
            from PIL import Image
        except ImportError:
            raise ImportError("ImageDataLoaders.from_folder reads images with Pillow: "
                              "pip install pillow") from None
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"no folder {root}")
        has_split = (root / train).is_dir() and (root / valid).is_dir()
        folders = [root / train, root / valid] if has_split else [root]
        items: list[list[tuple[Path, str]]] = []
        for folder in folders:
            found = sorted((f, f.parent.name) for f in folder.glob("*/*")
                           if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"no images in class sub-folders of {folder} (expected "
                                 f"{folder}/<class>/<image>{IMAGE_SUFFIXES[0]})")
            items.append(found)
        target = None if size is None else ((size, size) if isinstance(size, int) else tuple(size))
        arrays, labels = [], []
        for f, label in (it for group in items for it in group):
            with Image.open(f) as im:
                im = im.convert(mode)
                if target is not None:
                    im = im.resize((target[1], target[0]), Image.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
            arrays.append(a if a.ndim == 3 else a[:, :, None])
            labels.append(label)
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"images have different sizes {sorted(shapes)[:3]}: pass size=")
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        if has_split:
            n_train = len(items[0])
            kwargs["splits"] = (range(n_train), range(n_train, len(arrays)))
        kwargs.setdefault("vocab", sorted(set(labels)))
        return cls.from_tensors(x, labels, **kwargs)

    # -- showing ----------------------------------------------------------------------------
    def _normalize(self) -> Normalize | None:
        return next((t for t in self.after_batch if isinstance(t, Normalize)), None)

    def show_batch(self, max_n: int = 9, fname: str | Path = "batch.png", augmented: bool = False,
                   ncols: int | None = None) -> Path | None:
        """Write the first ``max_n`` training images (dataset order; with ``augmented`` as the
        augmentations would change them, without drawing from their generators) with their
        labels to a PNG grid. Returns the path, or None (with a warning) without matplotlib."""
        if self.train is None:
            raise ValueError("these DataLoaders have no training loader")
        x, y = self.train.first()[:2]
        if augmented:
            x, y = self.augment_preview((x, y))[:2]
        norm = self._normalize()
        if norm is not None:
            x = norm.decode(x)
        return show_images(x[:max_n], [self._label(v) for v in y[:max_n]], fname, ncols)

    def augment_preview(self, batch: tuple) -> tuple:
        """``batch`` (normalized) through the training augmentations, leaving their generators'
        states as they were."""
        norm = self._normalize()
        x = norm.decode(batch[0]) if norm is not None else batch[0]
        b = (x, *batch[1:])
        for t in self.train_tfms:
            g = getattr(t, "generator", None)
            state = g.get_state() if isinstance(g, torch.Generator) else None
            b = t(b)
            if state is not None:
                g.set_state(state)
        return norm(b) if norm is not None else b

    def _label(self, v) -> str:
        i = int(v)
        return str(self.vocab[i]) if self.vocab is not None and 0 <= i < len(self.vocab) else str(i)


def show_images(images: torch.Tensor, titles: Sequence[str] | None = None,
                fname: str | Path = "images.png", ncols: int | None = None) -> Path | None:
    """A grid of images ``[N, C, H, W]`` (values in [0, 1]; 1 or 3 channels) written to ``fname``."""
    images = images.detach().float().cpu().clamp(0, 1)
    n = len(images)
    if n == 0:
        raise ValueError("show_images: no images")
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    fig, _ = new_figure("show_batch")
    if fig is None:
        return None
    fig.clear()
    fig.set_size_inches(2 * ncols, 2 * nrows)
    for i in range(n):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        img = images[i]
        if img.shape[0] == 1:
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(img[:3].permute(1, 2, 0).numpy())
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=9)
        ax.axis("off")
    path = Path(fname)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


__all__ = ["ImageDataLoaders", "as_images", "encode_labels", "show_images"]
