"""``TabularModel`` (entity embeddings + batch-normed continuous inputs -> MLP) and
``tabular_learner``, as fastai's."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mlx_train.learner import Learner


def emb_sz_rule(n_cat: int) -> int:
    """fastai's embedding size for a categorical with ``n_cat`` codes (``#na#`` included)."""
    return min(600, round(1.6 * n_cat**0.56))


def get_emb_sz(dls, sz_dict: dict[str, int] | None = None) -> list[tuple[int, int]]:
    """``(n_codes, size)`` per categorical column of a ``TabularDataLoaders``; ``sz_dict``
    overrides sizes by column name."""
    sz_dict = sz_dict or {}
    unknown = sorted(set(sz_dict) - set(dls.cat_names))
    if unknown:
        raise ValueError(f"emb_szs names columns that are not categorical: {unknown}")
    out = []
    for c in dls.cat_names:
        n = len(dls.classes[c])
        out.append((n, sz_dict.get(c, emb_sz_rule(n))))
    return out


def lin_bn_drop(n_in: int, n_out: int, bn: bool, p: float, act: nn.Module | None) -> list[nn.Module]:
    """Linear (no bias before a BatchNorm) -> activation -> BatchNorm -> Dropout (fastai's
    ``LinBnDrop(lin_first=True)``)."""
    layers: list[nn.Module] = [nn.Linear(n_in, n_out, bias=not bn)]
    if act is not None:
        layers.append(act)
    if bn:
        layers.append(nn.BatchNorm1d(n_out))
    if p:
        layers.append(nn.Dropout(p))
    return layers


class SigmoidRange(nn.Module):
    """``sigmoid(x) * (high - low) + low``: regression outputs squeezed into ``y_range``."""

    def __init__(self, low: float, high: float):
        super().__init__()
        self.low, self.high = low, high

    def forward(self, x):
        return torch.sigmoid(x) * (self.high - self.low) + self.low


class TabularModel(nn.Module):
    """``forward(x_cat, x_cont)``: one embedding per categorical column (dropout ``embed_p``),
    the continuous columns through ``BatchNorm1d`` (``bn_cont``), concatenated, then
    ``layers`` hidden blocks (Linear -> ReLU -> BatchNorm -> Dropout ``ps``) and a Linear to
    ``out_sz`` (optionally squeezed into ``y_range``)."""

    def __init__(self, emb_szs: Sequence[tuple[int, int]], n_cont: int, out_sz: int,
                 layers: Sequence[int] = (200, 100), ps: float | Sequence[float] = 0.0,
                 embed_p: float = 0.0, y_range: tuple[float, float] | None = None,
                 use_bn: bool = True, bn_final: bool = False, bn_cont: bool = True):
        super().__init__()
        ps = [ps] * len(layers) if isinstance(ps, (int, float)) else list(ps)
        if len(ps) != len(layers):
            raise ValueError(f"ps has {len(ps)} values for {len(layers)} layers")
        self.embeds = nn.ModuleList(nn.Embedding(n, d) for n, d in emb_szs)
        for e in self.embeds:
            nn.init.trunc_normal_(e.weight, std=0.01)
        self.emb_drop = nn.Dropout(embed_p)
        self.bn_cont = nn.BatchNorm1d(n_cont) if bn_cont and n_cont else None
        self.n_emb, self.n_cont = sum(d for _, d in emb_szs), n_cont
        sizes = [self.n_emb + n_cont, *layers, out_sz]
        blocks: list[nn.Module] = []
        for i, (ni, no) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            last = i == len(sizes) - 2
            blocks += lin_bn_drop(ni, no, bn=(use_bn and not last) or (last and bn_final),
                                  p=0.0 if last else ps[i], act=None if last else nn.ReLU(inplace=True))
        if y_range is not None:
            blocks.append(SigmoidRange(*y_range))
        self.layers = nn.Sequential(*blocks)

    def forward(self, x_cat: torch.Tensor, x_cont: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.n_emb:
            if x_cat.shape[1] != len(self.embeds):
                raise ValueError(f"x_cat has {x_cat.shape[1]} columns; the model has "
                                 f"{len(self.embeds)} embeddings")
            x = torch.cat([e(x_cat[:, i]) for i, e in enumerate(self.embeds)], 1)
            parts.append(self.emb_drop(x))
        if self.n_cont:
            if x_cont.shape[1] != self.n_cont:
                raise ValueError(f"x_cont has {x_cont.shape[1]} columns; the model expects "
                                 f"{self.n_cont}")
            parts.append(self.bn_cont(x_cont) if self.bn_cont is not None else x_cont)
        return self.layers(torch.cat(parts, 1))


def tabular_learner(dls, layers: Sequence[int] | None = None, *,
                    emb_szs: dict[str, int] | None = None, n_out: int | None = None,
                    y_range: tuple[float, float] | None = None, ps: float | Sequence[float] = 0.0,
                    embed_p: float = 0.0, use_bn: bool = True, bn_final: bool = False,
                    bn_cont: bool = True, loss_func=None, **kwargs) -> Learner:
    """A ``Learner`` with a ``TabularModel`` for a ``TabularDataLoaders``: embedding sizes from
    ``emb_sz_rule`` (override per column with ``emb_szs={"col": size}``), hidden ``layers``
    (default ``[200, 100]``), ``n_out`` from the target (classes, or regression columns), loss
    cross-entropy for classification and MSE for regression. Other keyword arguments go to
    ``Learner``."""
    if not hasattr(dls, "cat_names"):
        raise TypeError("tabular_learner needs TabularDataLoaders (TabularDataLoaders.from_df)")
    classification = dls.y_block == "category"
    if n_out is None:
        n_out = len(dls.vocab) if classification else len(dls.y_names)
    model = TabularModel(get_emb_sz(dls, emb_szs), len(dls.cont_names), n_out,
                         [200, 100] if layers is None else layers, ps=ps, embed_p=embed_p,
                         y_range=y_range, use_bn=use_bn, bn_final=bn_final, bn_cont=bn_cont)
    if loss_func is None:
        loss_func = nn.CrossEntropyLoss() if classification else nn.MSELoss()
    return Learner(dls, model, loss_func, **kwargs)


__all__ = ["SigmoidRange", "TabularModel", "emb_sz_rule", "get_emb_sz", "lin_bn_drop",
           "tabular_learner"]
