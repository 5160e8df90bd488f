"""``vision_learner``: a convolutional body (torchvision's archs where installed, or the built-in
``simple_cnn``) cut before its pooling, plus a fastai-style head, with a body/head splitter for
freezing and discriminative learning rates. Image data is in ``mlx_train.vision_data``."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn

from mlx_train.learner import Learner
from mlx_train.vision_data import ImageDataLoaders, as_images, show_images


class AdaptiveConcatPool2d(nn.Module):
    """Adaptive max pooling and average pooling, concatenated on channels (fastai's)."""

    def __init__(self, size: int = 1):
        super().__init__()
        self.mp, self.ap = nn.AdaptiveMaxPool2d(size), nn.AdaptiveAvgPool2d(size)

    def forward(self, x):
        return torch.cat([self.mp(x), self.ap(x)], 1)


def conv_block(ni: int, nf: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv (no bias) -> BatchNorm -> ReLU."""
    return nn.Sequential(nn.Conv2d(ni, nf, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(nf), nn.ReLU(inplace=True))


def simple_cnn(n_in: int = 3, channels: Sequence[int] = (32, 64, 128)) -> nn.Sequential:
    """The built-in body: a stride-1 conv block, then one stride-2 block per further channel
    count (halving the resolution each time). No pooling: the head pools."""
    if not channels:
        raise ValueError("simple_cnn needs at least one channel count")
    layers = [conv_block(n_in, channels[0])]
    layers += [conv_block(a, b, stride=2) for a, b in zip(channels, channels[1:], strict=False)]
    return nn.Sequential(*layers)


BUILTIN_ARCHS: dict[str, Callable[..., nn.Module]] = {"simple_cnn": simple_cnn}


def _torchvision_models():
    try:
        import torchvision.models as models
    except Exception as e:  # ImportError, or a torchvision built for another torch
        raise ImportError(f"torchvision archs need a torchvision that matches torch "
                          f"{torch.__version__}: pip install torchvision ({e})") from None
    return models


def resolve_arch(arch, pretrained: bool = False, n_in: int = 3) -> tuple[nn.Module, bool]:
    """The network for ``arch`` and whether it is already a body (the built-in CNN is):

    - ``"simple_cnn"``: the built-in body, built for ``n_in`` channels;
    - any other name: ``torchvision.models.<name>`` (``weights="DEFAULT"`` when ``pretrained``,
      which downloads them unless they are cached);
    - a callable: called with ``pretrained`` (or ``weights``) when it takes it, else with nothing;
    - an ``nn.Module``: used as is."""
    if isinstance(arch, nn.Module):
        return arch, False
    if isinstance(arch, str):
        if arch in BUILTIN_ARCHS:
            if pretrained:
                raise ValueError(f"{arch!r} is built in and has no pretrained weights")
            return BUILTIN_ARCHS[arch](n_in=n_in), True
        models = _torchvision_models()
        names = sorted(models.list_models(module=models)) if hasattr(models, "list_models") else []
        if not hasattr(models, arch) or (names and arch not in names):
            raise ValueError(f"unknown arch {arch!r}: built in are {sorted(BUILTIN_ARCHS)}; "
                             f"torchvision has {', '.join(names[:12])}, ...")
        arch = getattr(models, arch)
        return arch(weights="DEFAULT" if pretrained else None), False
    if not callable(arch):
        raise TypeError(f"arch must be a name, a callable returning an nn.Module, or a module; "
                        f"got {type(arch).__name__}")
    params = inspect.signature(arch).parameters
    if "weights" in params:
        model = arch(weights="DEFAULT" if pretrained else None)
    elif "pretrained" in params:
        model = arch(pretrained=pretrained)
    else:
        model = arch()
    if not isinstance(model, nn.Module):
        raise TypeError(f"arch() returned {type(model).__name__}, not an nn.Module")
    return model, False


def _has_pool(m: nn.Module) -> bool:
    return any("Pool" in type(c).__name__ for c in m.modules())


def create_body(model: nn.Module, n_in: int = 3, pretrained: bool = False,
                cut: int | Callable | None = None) -> nn.Module:
    """The model's children up to (not including) the last one that pools (fastai's rule: for a
    torchvision ResNet, everything before ``avgpool``), or ``model.children()[:cut]``, or
    ``cut(model)``. The first conv is adapted to ``n_in`` channels (pretrained weights summed
    for 1 channel, repeated and rescaled for more)."""
    if callable(cut):
        body = cut(model)
    else:
        children = list(model.children())
        if cut is None:
            pools = [i for i, c in enumerate(children) if _has_pool(c)]
            if not pools:
                raise ValueError(f"cannot find where to cut {type(model).__name__}: it has no "
                                 "pooling layer among its children; pass cut=")
            cut = pools[-1]
        body = nn.Sequential(*children[:cut])
    _adapt_first_conv(body, n_in, pretrained)
    return body


def _adapt_first_conv(body: nn.Module, n_in: int, pretrained: bool) -> None:
    found = next(((n, m) for n, m in body.named_modules() if isinstance(m, nn.Conv2d)), None)
    if found is None:
        raise ValueError("the body has no Conv2d")
    name, conv = found
    if conv.in_channels == n_in:
        return
    w = conv.weight.detach()
    new = nn.Conv2d(n_in, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
    if pretrained:
        with torch.no_grad():
            if n_in == 1:
                new.weight.copy_(w.sum(1, keepdim=True))
            else:
                reps = -(-n_in // w.shape[1])
                new.weight.copy_(w.repeat(1, reps, 1, 1)[:, :n_in] * w.shape[1] / n_in)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    parent_name, _, attr = name.rpartition(".")
    setattr(body.get_submodule(parent_name) if parent_name else body, attr, new)


def num_features(body: nn.Module, n_in: int, size: int = 64) -> int:
    """Channels out of ``body`` for a ``[1, n_in, size, size]`` input (one dummy forward)."""
    was = body.training
    body.eval()
    with torch.no_grad():
        p = next(body.parameters())
        out = body(torch.zeros(1, n_in, size, size, device=p.device, dtype=p.dtype))
    body.train(was)
    return out.shape[1]


def create_head(nf: int, n_out: int, lin_ftrs: Sequence[int] | None = None, ps: float = 0.5,
                concat_pool: bool = True, bn_final: bool = False) -> nn.Sequential:
    """fastai's head: pool (max and average concatenated), flatten, then per layer BatchNorm ->
    Dropout -> Linear (-> ReLU but the last); dropout ``ps / 2`` before the hidden layers and
    ``ps`` before the last."""
    pool = AdaptiveConcatPool2d() if concat_pool else nn.AdaptiveAvgPool2d(1)
    sizes = [nf * (2 if concat_pool else 1), *(lin_ftrs if lin_ftrs is not None else [512]), n_out]
    ps_ = [ps / 2] * (len(sizes) - 2) + [ps]
    layers: list[nn.Module] = [pool, nn.Flatten()]
    for i, (ni, no, p) in enumerate(zip(sizes[:-1], sizes[1:], ps_, strict=True)):
        layers += [nn.BatchNorm1d(ni), nn.Dropout(p), nn.Linear(ni, no, bias=False)]
        if i < len(sizes) - 2:
            layers.append(nn.ReLU(inplace=True))
    if bn_final:
        layers.append(nn.BatchNorm1d(n_out, momentum=0.01))
    return nn.Sequential(*layers)


def body_head_split(model: nn.Sequential) -> list:
    """Two layer groups: the body ``model[0]`` and the head ``model[1]``."""
    return [model[0], model[1]]


def resnet_split(model: nn.Sequential) -> list:
    """fastai's three groups for a torchvision ResNet body: stem + layer1-2, layer3-4, head."""
    return [model[0][:6], model[0][6:], model[1]]


def vision_learner(dls, arch="simple_cnn", *, n_out: int | None = None, pretrained: bool = False,
                   loss_func=None, n_in: int | None = None, cut=None, splitter=None,
                   lin_ftrs: Sequence[int] | None = None, ps: float = 0.5,
                   concat_pool: bool = True, bn_final: bool = False, **kwargs) -> Learner:
    """A ``Learner`` for image classification: ``nn.Sequential(body, head)``.

    ``arch``: ``"simple_cnn"`` (built in), a torchvision name such as ``"resnet18"`` (needs a
    torchvision matching torch), a callable building a model, or a module. ``n_out`` defaults to
    the number of classes in ``dls.vocab``, ``n_in`` to the channels of ``dls.one_batch()``.
    Layer groups (``splitter``): body and head (three for torchvision ResNets). With
    ``pretrained`` the body starts frozen (``learn.fine_tune`` unfreezes it). Other keyword
    arguments go to ``Learner`` (``metrics``, ``wd``, ``cbs``, ...)."""
    if n_in is None:
        n_in = int(dls.one_batch()[0].shape[1])
    if n_out is None:
        if getattr(dls, "vocab", None) is None:
            raise ValueError("vision_learner: pass n_out= (the DataLoaders have no vocab)")
        n_out = len(dls.vocab)
    model, is_body = resolve_arch(arch, pretrained, n_in)
    body = model if is_body and cut is None else create_body(model, n_in, pretrained, cut)
    if is_body:
        _adapt_first_conv(body, n_in, pretrained)
    head = create_head(num_features(body, n_in), n_out, lin_ftrs, ps, concat_pool, bn_final)
    for m in head.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
    net = nn.Sequential(body, head)
    if splitter is None:
        is_resnet = type(model).__name__ == "ResNet" and cut is None and not is_body
        splitter = resnet_split if is_resnet else body_head_split
    learn = Learner(dls, net, loss_func or nn.CrossEntropyLoss(), splitter=splitter, **kwargs)
    if pretrained:
        learn.freeze()
    return learn


__all__ = ["AdaptiveConcatPool2d", "BUILTIN_ARCHS", "ImageDataLoaders", "as_images",
           "body_head_split", "conv_block", "create_body", "create_head", "num_features",
           "resnet_split", "show_images", "simple_cnn", "vision_learner"]
