"""``vision_learner``: a convolutional body (the built-in ``simple_cnn``, a torchvision
architecture cut where fastai's ``model_meta`` cuts it, or a timm model without its classifier)
plus a fastai-style head, with fastai's splitters for freezing and discriminative learning
rates; weights from a state_dict file; an export recipe for ``load_learner``. torchvision and
timm need a torchvision built for the installed torch (``requirements-vision.txt``). Image data
is in ``mlx_train.vision_data``."""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

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
TIMM_PREFIX = "timm/"


def resnet_split(model: nn.Sequential) -> list:
    """fastai's three groups for a torchvision ResNet body: stem + layer1-2, layer3-4, head."""
    return [model[0][:6], model[0][6:], model[1]]


def body_head_split(model: nn.Sequential) -> list:
    """Two layer groups: the body ``model[0]`` and the head ``model[1]``."""
    return [model[0], model[1]]


# fastai's model_meta, keyed by the torchvision class: where the body ends and how it splits.
# Classes not listed are cut before their last child that pools (MobileNetV3, EfficientNet,
# VGG, SqueezeNet: the same place fastai's table gives) and split into body and head.
MODEL_META: dict[str, dict] = {
    "ResNet": {"cut": -2, "split": resnet_split},
    "DenseNet": {"cut": -1},  # its features end with a pooling block, and it has no avgpool
}


def _import_torchvision_models():
    try:
        import torchvision.models as models
    except Exception as e:  # ImportError, or a torchvision built for another torch
        raise ImportError(f"torchvision archs need a torchvision that matches torch "
                          f"{torch.__version__}: pip install torchvision ({e})") from None
    return models


def _import_timm():
    try:
        import timm
    except Exception as e:
        raise ImportError(f"timm archs need timm (and a torchvision that matches torch "
                          f"{torch.__version__}): pip install timm ({e})") from None
    return timm


def _torchvision_builder(name: str):
    """``torchvision.models.<name>``, or None when torchvision has no such classifier."""
    models = _import_torchvision_models()
    names = models.list_models(module=models) if hasattr(models, "list_models") else []
    return getattr(models, name) if name in names else None


def _call_arch(arch: Callable, pretrained: bool, weights=None) -> nn.Module:
    """``arch`` called the way its signature asks: torchvision builders take ``weights``
    (``"DEFAULT"`` when ``pretrained``, or a torchvision ``Weights`` given as ``weights``),
    timm's and fastai-style ones ``pretrained``; anything else is called with no argument."""
    params = inspect.signature(arch).parameters
    if "weights" in params:
        model = arch(weights=weights if weights is not None else
                     ("DEFAULT" if pretrained else None))
    elif weights is not None:
        raise TypeError(f"{getattr(arch, '__name__', arch)!r} takes no weights=; pass a "
                        "state_dict file as weights='path.pth' instead")
    elif "pretrained" in params:
        model = arch(pretrained=pretrained)
    else:
        model = arch()
    if not isinstance(model, nn.Module):
        raise TypeError(f"arch() returned {type(model).__name__}, not an nn.Module")
    return model


def resolve_arch(arch, pretrained: bool = False, n_in: int = 3,
                 weights=None) -> tuple[nn.Module, bool]:
    """The network for ``arch`` and whether it is already a body (the built-in CNN is):

    - ``"simple_cnn"``: the built-in body, built for ``n_in`` channels;
    - ``"timm/<name>"``: ``timm.create_model(<name>)``;
    - ``"package.module:function"``: that callable (how ``export`` records a callable arch);
    - any other name: ``torchvision.models.<name>``, or timm's model of that name when
      torchvision has none (``weights="DEFAULT"`` / ``pretrained=True`` when ``pretrained``,
      which downloads the weights unless they are cached);
    - a callable (a torchvision builder such as ``resnet18``, a timm constructor, ...): called
      with ``weights`` or ``pretrained`` when it takes it, else with nothing;
    - an ``nn.Module``: used as is.

    ``weights``: a torchvision ``Weights`` value for a torchvision builder (a weights *file* is
    loaded later, by ``create_vision_model``)."""
    if isinstance(arch, nn.Module):
        return arch, False
    if isinstance(arch, str):
        if arch in BUILTIN_ARCHS:
            if pretrained:
                raise ValueError(f"{arch!r} is built in and has no pretrained weights")
            return BUILTIN_ARCHS[arch](n_in=n_in), True
        if arch.startswith(TIMM_PREFIX):
            return _import_timm().create_model(arch[len(TIMM_PREFIX):], pretrained=pretrained), False
        if ":" in arch:
            from mlx_train.export import import_path

            return _call_arch(import_path(arch), pretrained, weights), False
        try:
            builder, no_torchvision = _torchvision_builder(arch), None
        except ImportError as e:
            builder, no_torchvision = None, e
        if builder is not None:
            return _call_arch(builder, pretrained, weights), False
        try:
            timm = _import_timm()
        except ImportError:
            timm = None
        if timm is not None and timm.is_model(arch):
            return timm.create_model(arch, pretrained=pretrained), False
        if no_torchvision is not None:
            raise no_torchvision
        known = sorted(_import_torchvision_models().list_models())
        raise ValueError(f"unknown arch {arch!r}: built in are {sorted(BUILTIN_ARCHS)}; "
                         f"torchvision has {', '.join(known[:12])}, ...; timm models go as "
                         f"'{TIMM_PREFIX}<name>' (timm.list_models())")
    if not callable(arch):
        raise TypeError(f"arch must be a name, a callable returning an nn.Module, or a module; "
                        f"got {type(arch).__name__}")
    return _call_arch(arch, pretrained, weights), False


def is_timm(model: nn.Module) -> bool:
    """A model built by timm (it has ``forward_features`` and ``reset_classifier``)."""
    return type(model).__module__.startswith("timm.") and hasattr(model, "forward_features")


class TimmBody(nn.Module):
    """A timm model without its classifier as a body (fastai's ``TimmBody``): its feature map
    (``forward_features``) for the pooling head when the model pools (CNNs), else its pooled
    features (``needs_pool`` False, e.g. ViTs; the head then does not pool)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        model.reset_classifier(0)
        self.model = model
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", {}) or {}
        self.needs_pool = cfg.get("pool_size") is not None
        self.num_features = int(model.num_features)

    def forward(self, x):
        return self.model.forward_features(x) if self.needs_pool else self.model(x)


def _is_pool(m: nn.Module) -> bool:
    return re.search(r"Pool[123]d$", type(m).__name__) is not None


def _has_pool(m: nn.Module) -> bool:
    return any(_is_pool(c) for c in m.modules())


def create_body(model: nn.Module, n_in: int = 3, pretrained: bool = False,
                cut: int | Callable | None = None) -> nn.Module:
    """The model's children up to (not including) the last one that pools (fastai's rule: for a
    torchvision ResNet, everything before ``avgpool``), or ``model.children()[:cut]``, or
    ``cut(model)``. The first conv is adapted to ``n_in`` channels (pretrained weights summed
    for 1 channel, repeated and rescaled for more)."""
    body = _cut(model, cut)
    _adapt_first_conv(body, n_in, pretrained)
    return body


def _cut(model: nn.Module, cut: int | Callable | None) -> nn.Module:
    if callable(cut):
        return cut(model)
    children = list(model.children())
    if cut is None:
        pools = [i for i, c in enumerate(children) if _has_pool(c)]
        if not pools:
            raise ValueError(f"cannot find where to cut {type(model).__name__}: it has no "
                             "pooling layer among its children; pass cut=")
        cut = pools[-1]
    return nn.Sequential(*children[:cut])


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


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from a ``.safetensors`` file, or a torch ``.pth``/``.pt``/``.bin`` file
    (read with ``weights_only=True``: tensors only, nothing is unpickled that could run code;
    a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state_dict")
    return sd


def load_body_weights(model: nn.Module, body: nn.Module, path: str | Path) -> None:
    """Load the state_dict in ``path`` (saved from the whole network ``model``, e.g.
    ``torch.save(resnet18().state_dict(), "r18.pth")``) into ``body``, the part of ``model``
    kept by the cut. Every tensor of the body must be in the file with its shape; the file's
    other tensors (the network's own classifier) are ignored."""
    sd = read_state_dict(path)
    in_body = {id(t) for t in body.state_dict(keep_vars=True).values()}
    own = {k: t for k, t in model.state_dict(keep_vars=True).items() if id(t) in in_body}
    missing = sorted(k for k in own if k not in sd)
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} of the body's {len(own)} tensors "
                         f"(first: {missing[:3]}); is it a state_dict of this architecture "
                         f"({type(model).__name__})?")
    wrong = [f"{k}: {tuple(sd[k].shape)} vs {tuple(t.shape)}" for k, t in own.items()
             if tuple(sd[k].shape) != tuple(t.shape)]
    if wrong:
        raise ValueError(f"{path} has tensors of other shapes than the body's: {wrong[:3]}")
    model.load_state_dict({k: sd[k] for k in own}, strict=False)


def num_features(body: nn.Module, n_in: int, size: int = 64) -> int:
    """Channels out of ``body``: its ``num_features`` when it says (``TimmBody``), else from one
    dummy forward of a ``[1, n_in, size, size]`` input."""
    if isinstance(getattr(body, "num_features", None), int):
        return body.num_features
    was = body.training
    body.eval()
    with torch.no_grad():
        p = next(body.parameters())
        out = body(torch.zeros(1, n_in, size, size, device=p.device, dtype=p.dtype))
    body.train(was)
    return out.shape[1]


def create_head(nf: int, n_out: int, lin_ftrs: Sequence[int] | None = None, ps: float = 0.5,
                concat_pool: bool = True, bn_final: bool = False,
                pool: bool = True) -> nn.Sequential:
    """fastai's head: pool (max and average concatenated; no pooling with ``pool=False``, for
    bodies that pool themselves), flatten, then per layer BatchNorm -> Dropout -> Linear (->
    ReLU but the last); dropout ``ps / 2`` before the hidden layers and ``ps`` before the
    last."""
    concat = pool and concat_pool
    sizes = [nf * (2 if concat else 1), *(lin_ftrs if lin_ftrs is not None else [512]), n_out]
    ps_ = [ps / 2] * (len(sizes) - 2) + [ps]
    layers: list[nn.Module] = []
    if pool:
        layers += [AdaptiveConcatPool2d() if concat else nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    for i, (ni, no, p) in enumerate(zip(sizes[:-1], sizes[1:], ps_, strict=True)):
        layers += [nn.BatchNorm1d(ni), nn.Dropout(p), nn.Linear(ni, no, bias=False)]
        if i < len(sizes) - 2:
            layers.append(nn.ReLU(inplace=True))
    if bn_final:
        layers.append(nn.BatchNorm1d(n_out, momentum=0.01))
    return nn.Sequential(*layers)


def _build(arch, n_out: int, n_in: int = 3, pretrained: bool = False, weights=None, cut=None,
           custom_head: nn.Module | None = None, lin_ftrs: Sequence[int] | None = None,
           ps: float = 0.5, concat_pool: bool = True, bn_final: bool = False,
           init: Callable | None = nn.init.kaiming_normal_) -> tuple[nn.Sequential, dict]:
    """``create_vision_model`` and the arch's ``MODEL_META`` entry (its splitter)."""
    weights_file = weights if isinstance(weights, (str, os.PathLike)) else None
    model, is_body = resolve_arch(arch, pretrained, n_in,
                                  weights=None if weights_file is not None else weights)
    trained = pretrained or weights is not None
    torchvision_net = type(model).__module__.startswith("torchvision.")
    meta = MODEL_META.get(type(model).__name__, {}) if torchvision_net and cut is None else {}
    if is_body and cut is None:
        body = model
    elif is_timm(model) and cut is None:
        body = TimmBody(model)
    else:
        body = _cut(model, cut if cut is not None else meta.get("cut"))
    if weights_file is not None:
        load_body_weights(model, body, weights_file)
    _adapt_first_conv(body, n_in, trained)
    pool = getattr(body, "needs_pool", True)
    if custom_head is None:
        head = create_head(num_features(body, n_in), n_out, lin_ftrs, ps, concat_pool, bn_final,
                           pool=pool)
        if init is not None:
            for m in head.modules():
                if isinstance(m, nn.Linear):
                    init(m.weight)
    else:
        head = custom_head
    return nn.Sequential(body, head), meta


def create_vision_model(arch, n_out: int, n_in: int = 3, pretrained: bool = False,
                        weights=None, cut=None, custom_head: nn.Module | None = None,
                        lin_ftrs: Sequence[int] | None = None, ps: float = 0.5,
                        concat_pool: bool = True, bn_final: bool = False,
                        init: Callable | None = nn.init.kaiming_normal_) -> nn.Sequential:
    """``nn.Sequential(body, head)`` for ``arch`` (see ``resolve_arch``), as fastai builds it:

    - body: a torchvision network cut where fastai's ``model_meta`` cuts it (ResNets before
      ``avgpool``, i.e. ``cut=-2``; MobileNetV3 / EfficientNet / VGG: their ``features``), or
      ``cut`` (an index into the children, or a function of the model); a timm model without
      its classifier (``TimmBody``); the built-in ``simple_cnn`` as is. Its first conv takes
      ``n_in`` channels.
    - weights: ``pretrained`` (torchvision's ``weights="DEFAULT"`` / timm's ``pretrained=True``:
      a download unless cached), or ``weights``: a state_dict file (``.pth``, ``.pt``,
      ``.safetensors``) saved from the whole network, loaded into the body (see
      ``load_body_weights``), or a torchvision ``Weights`` value.
    - head: ``custom_head``, or ``create_head(num_features(body), n_out, ...)`` with its
      Linear weights initialised by ``init`` (kaiming normal)."""
    return _build(arch, n_out, n_in, pretrained, weights, cut, custom_head, lin_ftrs, ps,
                  concat_pool, bn_final, init)[0]


def _arch_name(arch) -> str | None:
    """``arch`` as a string ``resolve_arch`` turns back into it, or None (a module, a lambda)."""
    if isinstance(arch, str):
        return arch
    if isinstance(arch, nn.Module) or not callable(arch):
        return None
    name = f"{getattr(arch, '__module__', '')}:{getattr(arch, '__qualname__', '')}"
    try:
        from mlx_train.export import import_path

        return name if import_path(name) is arch else None
    except Exception:
        return None


def vision_learner(dls, arch="simple_cnn", *, n_out: int | None = None, pretrained: bool = False,
                   weights=None, loss_func=None, n_in: int | None = None, cut=None,
                   splitter=None, custom_head: nn.Module | None = None,
                   lin_ftrs: Sequence[int] | None = None, ps: float = 0.5,
                   concat_pool: bool = True, bn_final: bool = False, **kwargs) -> Learner:
    """A ``Learner`` for image classification: ``create_vision_model(arch, ...)``, i.e.
    ``nn.Sequential(body, head)``.

    ``arch``: ``"simple_cnn"`` (built in), a torchvision builder such as
    ``torchvision.models.resnet18`` or its name ``"resnet18"`` (needs a torchvision matching
    torch), a timm model (``"timm/resnet18"``, a timm constructor), any callable building a
    model, or a module. ``n_out`` defaults to the number of classes in ``dls.vocab``, ``n_in``
    to the channels of ``dls.one_batch()``. ``weights``: a state_dict file of the network
    loaded into the body. Layer groups (``splitter``): body and head (three for torchvision
    ResNets, as fastai). With ``pretrained`` or ``weights`` the body starts frozen, its norm
    layers training (``learn.fine_tune`` unfreezes it). ``learn.export()`` records how to
    rebuild the model when ``arch`` is a name or an importable function. Other keyword
    arguments go to ``Learner`` (``metrics``, ``wd``, ``cbs``, ...)."""
    if n_in is None:
        n_in = int(dls.one_batch()[0].shape[1])
    if n_out is None:
        if getattr(dls, "vocab", None) is None:
            raise ValueError("vision_learner: pass n_out= (the DataLoaders have no vocab)")
        n_out = len(dls.vocab)
    net, meta = _build(arch, n_out, n_in, pretrained, weights, cut, custom_head, lin_ftrs, ps,
                       concat_pool, bn_final)
    learn = Learner(dls, net, loss_func or nn.CrossEntropyLoss(),
                    splitter=splitter or meta.get("split", body_head_split), **kwargs)
    name = _arch_name(arch)
    if name is not None and custom_head is None and (cut is None or isinstance(cut, int)):
        learn.model_recipe = ("mlx_train.vision:create_vision_model",
                              {"arch": name, "n_out": n_out, "n_in": n_in, "cut": cut,
                               "lin_ftrs": None if lin_ftrs is None else list(lin_ftrs),
                               "ps": ps, "concat_pool": concat_pool, "bn_final": bn_final})
    if pretrained or weights is not None:
        learn.freeze()
    return learn


__all__ = ["AdaptiveConcatPool2d", "BUILTIN_ARCHS", "ImageDataLoaders", "MODEL_META", "TimmBody",
           "as_images", "body_head_split", "conv_block", "create_body", "create_head",
           "create_vision_model", "is_timm", "load_body_weights", "num_features",
           "read_state_dict", "resnet_split", "resolve_arch", "show_images", "simple_cnn",
           "vision_learner"]
