"""The building blocks recipe configs name with ``_target_``: models, schedules, checkpoints.

Optimizers (``torch.optim.*`` with ``_partial_: true``), adapters (``mlx_adapters.LoraConfig``),
loggers (``mlx_train.CSVLogger``) and data (``mlx_train.lm_data``, ``mlx_train.recipes.tasks``)
are named directly; this module holds what has no other home.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mlx_train.callback.core import Callback
from mlx_train.callback.schedule import SchedNo, combined_cos

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


# -- models ---------------------------------------------------------------------------------
def pretrained_model(source: str, dtype: str = "float32") -> nn.Module:
    """``mlx_core.load_model(source)``: a registered name, an HF-format directory or a ``.gguf``;
    trained with selective recompute (``mlx_core.transforms.selective_recompute``), as every
    model a recipe builds."""
    from mlx_core import load_model
    from mlx_core.transforms import selective_recompute

    return selective_recompute(load_model(source, dtype=_dtype(dtype)))


def preset_model(preset: str, overrides: dict | None = None, dtype: str = "float32",
                 tokenizer=None) -> nn.Module:
    """A randomly initialised model from the named preset, with ``overrides`` (``ModelConfig``
    fields) applied; given a ``tokenizer``, its vocabulary size and special tokens too."""
    from mlx_core import build_model, get_preset
    from mlx_core.transforms import selective_recompute

    config = get_preset(preset)
    changes = dict(overrides or {})
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(config)})
    if unknown:
        raise ValueError(f"model.overrides: ModelConfig has no field(s) {unknown}")
    if tokenizer is not None:
        eos = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
        changes.setdefault("vocab_size", tokenizer.vocab_size)
        changes.setdefault("eos_token_id", eos)
        changes.setdefault("bos_token_id", tokenizer.bos_token_id)
        changes.setdefault("pad_token_id", tokenizer.pad_token_id)
    return selective_recompute(build_model(dataclasses.replace(config, **changes),
                                           dtype=_dtype(dtype)))


# -- schedules ------------------------------------------------------------------------------
class OneCycle:
    """``Learner.fit_one_cycle``: warm-up to ``lr`` over ``pct_start``, then cosine annealing."""

    def __init__(self, pct_start: float = 0.25, div: float = 25.0, div_final: float = 1e5):
        self.pct_start, self.div, self.div_final = pct_start, div, div_final

    def fit(self, learn, n_epoch: int, lr: float, cbs=None, start_epoch: int = 0) -> None:
        learn.fit_one_cycle(n_epoch, lr, div=self.div, div_final=self.div_final,
                            pct_start=self.pct_start, cbs=cbs, start_epoch=start_epoch)

    def schedules(self, lr: float, moms) -> dict:
        """What ``fit_one_cycle`` schedules, as functions of the share of training done (for
        loops other than the Learner's: the JAX backend)."""
        return {"lr": combined_cos(self.pct_start, lr / self.div, lr, lr / self.div_final),
                "mom": combined_cos(self.pct_start, *moms)}


class FlatCos:
    """``Learner.fit_flat_cos``: flat ``lr``, then cosine annealing after ``pct_start``."""

    def __init__(self, pct_start: float = 0.75, div_final: float = 1e5):
        self.pct_start, self.div_final = pct_start, div_final

    def fit(self, learn, n_epoch: int, lr: float, cbs=None, start_epoch: int = 0) -> None:
        learn.fit_flat_cos(n_epoch, lr, div_final=self.div_final, pct_start=self.pct_start,
                           cbs=cbs, start_epoch=start_epoch)

    def schedules(self, lr: float, moms) -> dict:
        return {"lr": combined_cos(self.pct_start, lr, lr, lr / self.div_final)}


class Constant:
    """``Learner.fit`` at a constant ``lr``."""

    def fit(self, learn, n_epoch: int, lr: float, cbs=None, start_epoch: int = 0) -> None:
        learn.fit(n_epoch, lr, cbs=cbs, start_epoch=start_epoch)

    def schedules(self, lr: float, moms) -> dict:
        return {"lr": SchedNo(lr, lr)}


# -- checkpoints ----------------------------------------------------------------------------
class LastCheckpoint(Callback):
    """Every ``every`` epochs (and after the last), ``learn.save(fname)`` with the optimizer:
    the file a resumed run loads (``Learner.load`` then ``fit(..., start_epoch=epochs_done)``).
    Runs after the Recorder has logged the epoch, so the history is in the file."""

    order = 65

    def __init__(self, fname: str = "last", every: int = 1):
        self.fname, self.every = fname, every

    def after_epoch(self):
        last = self.learn.epoch + 1 == self.learn.n_epoch
        if (self.learn.epoch + 1) % self.every == 0 or last:
            self.learn.save(self.fname, with_opt=True)


__all__ = ["Constant", "FlatCos", "LastCheckpoint", "OneCycle", "preset_model", "pretrained_model"]
