"""Layer groups over a torch optimizer: per-group hyper-parameters, freezing, no decay on norms/biases.

A *splitter* maps a model to a list of parameter groups (layer groups), earliest layers first.
Each layer group becomes one or two torch param groups: the weights that decay, and the norm
parameters and biases that never do (with AdamW this is true, decoupled weight decay). Hyper-
parameters are set per layer group: ``lr``, ``wd``, ``mom`` (Adam's beta1 or SGD's momentum),
``sqr_mom`` (Adam's beta2), ``eps``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
              nn.RMSNorm)


def is_norm(module: nn.Module) -> bool:
    """Torch's norm layers, and any module class whose name ends in ``Norm`` (e.g. the zoo's RMSNorm)."""
    return isinstance(module, NORM_TYPES) or type(module).__name__.endswith("Norm")


def norm_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters owned directly by norm layers."""
    return [p for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)]


def bias_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters named ``bias`` in any module."""
    return [p for m in model.modules() for n, p in m.named_parameters(recurse=False) if n == "bias"]


def trainable_params(model: nn.Module) -> list[list[nn.Parameter]]:
    """The default splitter: one layer group with every parameter that requires grad."""
    return [[p for p in model.parameters() if p.requires_grad]]


def even_mults(start: float, stop: float, n: int) -> np.ndarray:
    """``n`` values from ``start`` to ``stop``, evenly spaced geometrically (fastai's)."""
    if n == 1:
        return np.array([stop], dtype=np.float64)
    step = (stop / start) ** (1 / (n - 1))
    return np.array([start * step**i for i in range(n)], dtype=np.float64)


def check_groups(model: nn.Module, groups) -> list[list[nn.Parameter]]:
    """Validate a splitter's output: a non-empty list of non-empty groups of the model's parameters."""
    if isinstance(groups, (nn.Parameter, torch.Tensor)) or not isinstance(groups, Iterable):
        raise TypeError("a splitter must return a list of parameter groups (lists of parameters "
                        f"or modules), got {type(groups).__name__}")
    owned = {id(p): n for n, p in model.named_parameters(remove_duplicate=True)}
    result, seen = [], {}
    for i, group in enumerate(groups):
        if isinstance(group, nn.Module):
            group = list(group.parameters())
        elif isinstance(group, (nn.Parameter, torch.Tensor)):
            raise TypeError(f"splitter group {i} is a single tensor; wrap it in a list: [[param], ...]")
        params = []
        for p in group:
            if isinstance(p, nn.Module):
                params.extend(p.parameters())
            else:
                params.append(p)
        unique = []
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"splitter group {i} holds a {type(p).__name__}, not a parameter")
            if id(p) not in owned:
                raise ValueError(f"splitter group {i} holds a parameter of shape {tuple(p.shape)} "
                                 "that is not in the model (did the splitter build a new module, "
                                 "or look at a different model?)")
            if id(p) in seen and seen[id(p)] != i:
                raise ValueError(f"parameter {owned[id(p)]!r} is in splitter groups "
                                 f"{seen[id(p)]} and {i}; each parameter belongs to one group")
            if id(p) not in seen:
                seen[id(p)] = i
                unique.append(p)
        if not unique:
            raise ValueError(f"splitter group {i} is empty (no parameters, or none that "
                             "require grad for the default splitter)")
        result.append(unique)
    if not result:
        raise ValueError("the splitter returned no parameter groups")
    return result


class LayerGroupOptimizer:
    """A torch optimizer (``self.opt``) whose param groups are organised in layer groups.

    Behaves like the torch optimizer for ``step``, ``zero_grad``, ``param_groups`` and ``state``,
    so it can be handed to ``GradScaler`` or a clipping function.
    """

    def __init__(self, opt_func: Callable, groups: Sequence[Sequence[nn.Parameter]], lr: float,
                 no_decay: Iterable[nn.Parameter] = (), force_train: Iterable[nn.Parameter] = ()):
        self.layer_groups = [list(g) for g in groups]
        no_decay_ids = {id(p) for p in no_decay}
        self.force_train_ids = {id(p) for p in force_train}
        torch_groups = []
        for i, params in enumerate(self.layer_groups):
            decay = [p for p in params if id(p) not in no_decay_ids]
            keep = [p for p in params if id(p) in no_decay_ids]
            if decay:
                torch_groups.append({"params": decay, "layer_group": i, "no_decay": False})
            if keep:
                torch_groups.append({"params": keep, "layer_group": i, "no_decay": True,
                                     "weight_decay": 0.0})
        self.opt = opt_func(torch_groups, lr=lr)
        for pg in self.opt.param_groups:  # an opt_func that rebuilt the groups loses our keys
            if "layer_group" not in pg:
                raise TypeError("opt_func must build the optimizer from the param groups it is "
                                "given (e.g. torch.optim.AdamW or functools.partial of it)")
            if pg["no_decay"]:
                pg["weight_decay"] = 0.0
        self.frozen_idx = 0

    # -- torch optimizer interface ---------------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        return self.opt.param_groups

    @property
    def state(self):
        return self.opt.state

    def step(self, closure=None):
        return self.opt.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)

    @property
    def n_groups(self) -> int:
        return len(self.layer_groups)

    def all_params(self) -> list[nn.Parameter]:
        return [p for g in self.layer_groups for p in g]

    # -- hyper-parameters -------------------------------------------------------------------
    def _torch_groups(self, i: int) -> list[dict]:
        return [pg for pg in self.opt.param_groups if pg["layer_group"] == i]

    def supports(self, name: str) -> bool:
        pg = self.opt.param_groups[0]
        return {"lr": "lr" in pg, "wd": "weight_decay" in pg,
                "mom": "betas" in pg or "momentum" in pg, "sqr_mom": "betas" in pg,
                "eps": "eps" in pg}.get(name, name in pg)

    @property
    def last_lr(self) -> float:
        """``hypers[-1]["lr"]`` without building every group's dict (read once per batch)."""
        groups = self._torch_groups(self.n_groups - 1)
        return next((pg for pg in groups if not pg["no_decay"]), groups[0])["lr"]

    @property
    def hypers(self) -> list[dict]:
        """One dict per layer group: lr, wd, mom, sqr_mom, eps (those the optimizer has)."""
        out = []
        for i in range(self.n_groups):
            groups = self._torch_groups(i)
            decaying = [pg for pg in groups if not pg["no_decay"]]
            pg = (decaying or groups)[0]
            h = {"lr": pg["lr"]}
            if "weight_decay" in pg:
                h["wd"] = pg["weight_decay"] if decaying else self.opt.defaults.get("weight_decay", 0.0)
            if "betas" in pg:
                h["mom"], h["sqr_mom"] = pg["betas"]
            elif "momentum" in pg:
                h["mom"] = pg["momentum"]
            if "eps" in pg:
                h["eps"] = pg["eps"]
            out.append(h)
        return out

    def _values(self, name: str, value) -> list[float]:
        n = self.n_groups
        if isinstance(value, slice):
            if value.step is not None:
                raise ValueError(f"{name}=slice(...) takes start and stop only")
            if value.start:
                if n == 1:
                    raise ValueError(
                        f"{name}=slice({value.start}, {value.stop}) spreads values over layer "
                        "groups, but the model has a single layer group; pass a number, or give "
                        "the Learner a splitter that returns several groups")
                values = even_mults(value.start, value.stop, n)
            else:
                values = [value.stop / 10] * (n - 1) + [value.stop]
        elif isinstance(value, (list, tuple, np.ndarray, torch.Tensor)):
            values = np.asarray(value, dtype=np.float64).reshape(-1)
            if len(values) == 1:
                values = np.repeat(values, n)
        else:
            values = [value] * n
        if len(values) != n:
            raise ValueError(f"got {len(values)} values for {name} but the optimizer has {n} layer "
                             "groups")
        return [float(v) for v in values]

    def set_hyper(self, name: str, value) -> None:
        """Set ``name`` for every layer group: a number, one value per group, or a slice."""
        if name not in ("lr", "wd", "mom", "sqr_mom", "eps"):
            raise ValueError(f"unknown hyper-parameter {name!r}; known: lr, wd, mom, sqr_mom, eps")
        for i, v in enumerate(self._values(name, value)):
            for pg in self._torch_groups(i):
                if name == "lr":
                    pg["lr"] = v
                elif name == "wd":
                    if "weight_decay" not in pg:
                        raise ValueError(f"{type(self.opt).__name__} has no weight decay")
                    if not pg["no_decay"]:
                        pg["weight_decay"] = v
                elif name == "mom":
                    if "betas" in pg:
                        pg["betas"] = (v, pg["betas"][1])
                    elif "momentum" in pg:
                        pg["momentum"] = v
                    else:
                        raise ValueError(f"{type(self.opt).__name__} has no momentum to set")
                elif name == "sqr_mom":
                    pg["betas"] = (pg["betas"][0], v)
                else:
                    pg["eps"] = v

    # -- freezing ---------------------------------------------------------------------------
    def freeze_to(self, n: int) -> None:
        """Freeze the layer groups before ``n`` (negative counts from the end), unfreeze the rest.

        Frozen groups' parameters get ``requires_grad=False``, except the ``force_train`` ones
        (norm layers' parameters when the learner has ``train_bn=True``).
        """
        idx = n if n >= 0 else self.n_groups + n
        if idx >= self.n_groups:
            warnings.warn(f"freeze_to({n}) freezes all {self.n_groups} layer groups: nothing but "
                          "forced-trainable norm parameters will train", stacklevel=3)
        idx = max(0, idx)
        self.frozen_idx = idx
        for i, group in enumerate(self.layer_groups):
            for p in group:
                p.requires_grad_(i >= idx or id(p) in self.force_train_ids)

    def clear_state(self) -> None:
        """Forget the optimizer's per-parameter state (moments, step counts)."""
        self.opt.state.clear()

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict(), "frozen_idx": self.frozen_idx}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        for pg in self.opt.param_groups:
            if "betas" in pg:
                pg["betas"] = tuple(pg["betas"])
        self.freeze_to(state.get("frozen_idx", 0))


__all__ = ["LayerGroupOptimizer", "bias_params", "check_groups", "even_mults", "is_norm",
           "norm_params", "trainable_params"]
