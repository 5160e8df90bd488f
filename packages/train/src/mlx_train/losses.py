"""Loss functions the Learner knows how to default, activate (for predictions) and decode."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalLMLoss(nn.Module):
    """Next-token cross-entropy for logits ``[B, T, V]`` and labels ``[B, T]`` (the zoo's convention).

    Labels are the input ids (or a copy with ``ignore_index`` where no loss is wanted); the shift
    by one position happens here, as in ``mlx_core.Transformer(labels=...)``.
    """

    def __init__(self, ignore_index: int = -100):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 3 or labels.shape != logits.shape[:2]:
            raise ValueError(f"CausalLMLoss expects logits [B, T, V] and labels [B, T]; got "
                             f"{tuple(logits.shape)} and {tuple(labels.shape)}")
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                               labels[:, 1:].reshape(-1), ignore_index=self.ignore_index)


def default_loss_func(model: nn.Module, dls=None):
    """The loss a model or its data asks for: ``model.loss_func``, the dataset's ``loss_func``,
    or ``CausalLMLoss`` for the mlx_core zoo ``Transformer``; ``None`` when nothing says."""
    loss = getattr(model, "loss_func", None)
    if loss is not None:
        return loss
    train = getattr(dls, "train", None) if dls is not None else None
    loss = getattr(getattr(train, "dataset", None), "loss_func", None)
    if loss is not None:
        return loss
    try:
        from mlx_core.models.transformer import Transformer
    except ImportError:  # pragma: no cover - mlx-core[torch] is a dependency
        return None
    return CausalLMLoss() if isinstance(model, Transformer) else None


_SOFTMAX = (nn.CrossEntropyLoss, CausalLMLoss)
_SIGMOID = (nn.BCEWithLogitsLoss,)


def activation_name(loss_func) -> str:
    """``softmax``, ``sigmoid`` or ``none``: what turns model outputs into predictions."""
    if isinstance(loss_func, _SOFTMAX) or loss_func is F.cross_entropy:
        return "softmax"
    if isinstance(loss_func, _SIGMOID) or loss_func is F.binary_cross_entropy_with_logits:
        return "sigmoid"
    return "none"


def decode_name(loss_func) -> str:
    """``argmax``, ``threshold`` (>0.5 after sigmoid) or ``none``: how predictions become labels."""
    return {"softmax": "argmax", "sigmoid": "threshold"}.get(activation_name(loss_func), "none")


ACTIVATIONS = {"softmax": lambda x: F.softmax(x.float(), dim=-1), "sigmoid": lambda x: torch.sigmoid(x.float()),
               "none": lambda x: x}
DECODES = {"argmax": lambda x: x.argmax(dim=-1), "threshold": lambda x: x > 0.5, "none": lambda x: x}


def activation_for(loss_func):
    """``loss_func.activation`` if it has one, else the activation its kind implies."""
    act = getattr(loss_func, "activation", None)
    return act if callable(act) else ACTIVATIONS[activation_name(loss_func)]


def decodes_for(loss_func):
    dec = getattr(loss_func, "decodes", None)
    return dec if callable(dec) else DECODES[decode_name(loss_func)]


__all__ = ["CausalLMLoss", "activation_for", "decodes_for", "default_loss_func"]
