"""``export``: a trained model for inference, as safetensors + a JSON description (read back by
``mlx_train.load_learner``).

The file holds the model weights (``model.<key>``) and, in its metadata, JSON that says how to
rebuild everything else: the model, the loss (hence the activation and decoding of
predictions), the batch transforms (``Normalize`` statistics), ``n_inp`` and the class names.
Nothing is pickled, so nothing runs on load except code you name:

- an mlx_core zoo ``Transformer`` is rebuilt from its ``ModelConfig``;
- any other model is rebuilt by a *factory*: ``export(model_factory="my_pkg.models:make_net",
  model_kwargs={"width": 64})`` records an importable function and JSON arguments (checked at
  export time by building the model and comparing parameter names and shapes);
- a learner that knows how its model was built (``vision_learner``: ``learn.model_recipe``)
  records that factory without being asked;
- otherwise the file records the class name only, and ``load_learner`` needs ``model=`` (a
  module, or a zero-argument callable that builds one).
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from pathlib import Path

import torch
from torch import nn

from mlx_train.data import BATCH_TRANSFORMS
from mlx_train.losses import ACTIVATIONS, DECODES, CausalLMLoss, activation_name, decode_name
from mlx_train.state import atomic_save, model_tensors

FORMAT = "mlx-train-export"
_LOSS_KWARGS = ("reduction", "ignore_index", "label_smoothing", "beta", "delta", "eps", "full",
                "log_input", "margin", "p")


def import_path(path: str):
    """``"package.module:attr.sub"`` -> the object."""
    module, _, qual = path.partition(":")
    if not module or not qual:
        raise ValueError(f"expected 'package.module:function', got {path!r}")
    obj = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def _class_path(obj) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def _mlx_config(model: nn.Module):
    from mlx_core.config import ModelConfig

    config = getattr(model, "config", None)
    return config if isinstance(config, ModelConfig) else None


def _signature(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def describe_model(model: nn.Module, model_factory: str | None = None,
                   model_kwargs: dict | None = None) -> dict:
    if model_factory is not None:
        factory = import_path(model_factory)
        built = factory(**(model_kwargs or {}))
        if not isinstance(built, nn.Module):
            raise TypeError(f"{model_factory}(**model_kwargs) returned {type(built).__name__}, "
                            "not an nn.Module")
        if _signature(built) != _signature(model):
            ours, theirs = _signature(model), _signature(built)
            diff = sorted(set(ours.items()) ^ set(theirs.items()))[:5]
            raise ValueError(f"{model_factory}(**model_kwargs) builds a model whose parameters "
                             f"differ from the learner's (first differences: {diff})")
        return {"kind": "factory", "factory": model_factory, "kwargs": model_kwargs or {},
                "class": _class_path(model)}
    config = _mlx_config(model)
    if config is not None:
        return {"kind": "mlx_core", "config": config.to_dict(), "class": _class_path(model)}
    return {"kind": "custom", "class": _class_path(model)}


def build_model(desc: dict, model=None) -> nn.Module:
    if model is not None:
        built = model if isinstance(model, nn.Module) else model()
        if not isinstance(built, nn.Module):
            raise TypeError(f"model= must be an nn.Module or a callable returning one, got "
                            f"{type(built).__name__}")
        return built
    if desc["kind"] == "mlx_core":
        from mlx_core.config import ModelConfig
        from mlx_core.models.loading import build_model as build_zoo

        return build_zoo(ModelConfig.from_dict(desc["config"]), init=False)
    if desc["kind"] == "factory":
        return import_path(desc["factory"])(**desc["kwargs"])
    raise ValueError(f"this export holds a custom model ({desc['class']}) and no recipe to build "
                     "it: pass model= to load_learner (the module, or a function that builds it), "
                     "or export with model_factory='package.module:function'")


def describe_loss(loss) -> tuple[dict, dict[str, torch.Tensor]]:
    cls = type(loss)
    known = isinstance(loss, CausalLMLoss) or (isinstance(loss, nn.Module)
                                               and cls.__module__.startswith("torch.nn."))
    if not known:
        return {"kind": "custom", "class": _class_path(loss)}, {}
    params = inspect.signature(cls).parameters
    kwargs = {k: getattr(loss, k) for k in _LOSS_KWARGS
              if k in params and isinstance(getattr(loss, k, None), (int, float, str, bool))}
    buffers = {f"loss.{n}": b for n, b in loss.named_buffers() if b is not None}
    return {"kind": "mlx_train" if isinstance(loss, CausalLMLoss) else "torch",
            "class": cls.__name__, "kwargs": kwargs}, buffers


class ExportedLossPlaceholder:
    """Stands in for a loss that could not be exported: predictions work, training does not."""

    def __init__(self, name: str, activation: str, decodes: str):
        self.name = name
        self.activation, self.decodes = ACTIVATIONS[activation], DECODES[decodes]

    def __call__(self, *args):
        raise ValueError(f"this learner was loaded without its loss ({self.name}); pass "
                         "loss_func= to load_learner to validate or train")


def build_loss(desc: dict, tensors: dict, activation: str, decodes: str):
    if desc["kind"] == "custom":
        return ExportedLossPlaceholder(desc["class"], activation, decodes)
    cls = CausalLMLoss if desc["kind"] == "mlx_train" else getattr(nn, desc["class"])
    buffers = {k[len("loss."):]: v for k, v in tensors.items() if k.startswith("loss.")}
    return cls(**desc["kwargs"], **buffers)


def export(learn, fname: str | Path = "export.safetensors", model_factory: str | None = None,
           model_kwargs: dict | None = None) -> Path:
    """Write the model and what inference needs to ``learn.path / fname`` (see the module doc).
    No optimizer, no training data. Without ``model_factory``, the learner's own
    ``model_recipe`` (set by ``vision_learner``) names the factory, if it has one."""
    if model_factory is None and getattr(learn, "model_recipe", None) is not None:
        model_factory, model_kwargs = learn.model_recipe
    path = Path(fname)
    path = (path if path.suffix else path.with_suffix(".safetensors"))
    path = path if path.is_absolute() else Path(learn.path) / path
    tensors, aliases = model_tensors(learn.model)
    loss_desc, loss_tensors = describe_loss(learn.loss_func)
    tensors.update(loss_tensors)
    dls = learn.dls
    tfms = []
    for t in (dls.after_batch if dls is not None else []):
        if type(t).__name__ in BATCH_TRANSFORMS and hasattr(t, "to_dict"):
            tfms.append(t.to_dict())
        else:
            warnings.warn(f"batch transform {t!r} is not exported; pass it to load_learner "
                          "with after_batch=", stacklevel=3)
    meta = {"format": FORMAT, "version": 1,
            "model": describe_model(learn.model, model_factory, model_kwargs), "aliases": aliases,
            "loss": loss_desc, "activation": activation_name(learn.loss_func),
            "decodes": decode_name(learn.loss_func), "after_batch": tfms,
            "n_inp": getattr(dls, "n_inp", None), "vocab": getattr(dls, "vocab", None)}
    return atomic_save(tensors, path, meta)


__all__ = ["build_loss", "build_model", "export", "import_path"]
