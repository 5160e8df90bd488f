"""Tabular data from a pandas ``DataFrame``: the procs (``FillMissing``, ``Categorify``,
``Normalize``), ``TabularDataLoaders.from_df`` and ``show_batch``. The model and
``tabular_learner`` are in ``mlx_train.tabular_model``. Needs pandas (``pip install pandas``).

Every proc learns its statistics from the TRAINING rows only (medians, categories, means and
standard deviations) and applies them to every split and to new data (``dls.test_dl(df)``).
Batches are ``(x_cat [N, n_cat] int64, x_cont [N, n_cont] float32, y)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from mlx_train.data import DataLoaders, Loader, RandomSplitter, StratifiedSplitter


def _pd():
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("mlx_train.tabular needs pandas: pip install pandas "
                          "(or pip install 'mlx-train[tabular]')") from None
    return pd


class TabularProc:
    """A step that learns from the training rows (``setup``) and transforms any frame
    (``__call__``, returning a new frame). ``order`` fixes the order procs run in."""

    order = 0

    def setup(self, tab: TabularDataLoaders, train) -> None:
        """Learn statistics from ``train`` (a DataFrame); may add columns to ``tab.cat_names``."""

    def __call__(self, tab: TabularDataLoaders, df):
        return df

    def __repr__(self) -> str:
        return type(self).__name__


class FillMissing(TabularProc):
    """Fill missing continuous values with the training ``median`` (or ``mean``, or ``constant``
    ``fill_val``) and, with ``add_col``, add a ``<name>_na`` indicator column (a categorical)
    for every continuous column that has missing values in the training rows."""

    order = 1

    def __init__(self, fill_strategy: str = "median", fill_val: float = 0.0, add_col: bool = True):
        if fill_strategy not in ("median", "mean", "constant"):
            raise ValueError(f"fill_strategy must be median, mean or constant, got {fill_strategy!r}")
        self.fill_strategy, self.fill_val, self.add_col = fill_strategy, fill_val, add_col
        self.na_dict: dict[str, float] = {}

    def setup(self, tab, train):
        self.na_dict = {}
        for c in tab.cont_names:
            col = train[c]
            if self.fill_strategy == "constant":
                value = self.fill_val
            else:
                value = float(col.median() if self.fill_strategy == "median" else col.mean())
                if np.isnan(value):
                    raise ValueError(f"FillMissing: column {c!r} has no value in the training rows")
            self.na_dict[c] = value
        self.na_cols = [c for c in tab.cont_names if train[c].isna().any()] if self.add_col else []
        tab.cat_names += [f"{c}_na" for c in self.na_cols if f"{c}_na" not in tab.cat_names]

    def __call__(self, tab, df):
        df = df.copy()
        for c in self.na_cols:
            df[f"{c}_na"] = df[c].isna()
        for c, v in self.na_dict.items():
            df[c] = df[c].astype("float64").fillna(v)
        return df


class Categorify(TabularProc):
    """Map each categorical column to integer codes: 0 is ``#na#`` (missing, or a value never
    seen in training), then the training values in sorted order (``classes[col]``)."""

    order = 2

    def setup(self, tab, train):
        pd = _pd()
        self.classes = {}
        for c in tab.cat_names:
            values = train[c].dropna().unique().tolist()
            self.classes[c] = ["#na#", *sorted(values, key=lambda v: (str(type(v)), v))]
            if pd.api.types.is_bool_dtype(train[c]) and len(values) < 2:
                self.classes[c] = ["#na#", False, True]
        tab.classes = self.classes

    def __call__(self, tab, df):
        pd = _pd()
        df = df.copy()
        for c, classes in self.classes.items():
            index = {v: i for i, v in enumerate(classes) if i}
            df[c] = [0 if pd.isna(v) else index.get(v, 0) for v in df[c].tolist()]
        return df


class Normalize(TabularProc):
    """``(x - mean) / (std + 1e-7)`` on each continuous column (training mean, population std)."""

    order = 3

    def setup(self, tab, train):
        self.means = {c: float(train[c].astype("float64").mean()) for c in tab.cont_names}
        self.stds = {c: float(train[c].astype("float64").std(ddof=0)) + 1e-7 for c in tab.cont_names}
        bad = [c for c in tab.cont_names if np.isnan(self.means[c]) or np.isnan(self.stds[c])]
        if bad:
            raise ValueError(f"Normalize: no statistics for {bad} (all missing in training? put "
                             "FillMissing in procs)")

    def __call__(self, tab, df):
        df = df.copy()
        for c in tab.cont_names:
            df[c] = (df[c].astype("float64") - self.means[c]) / self.stds[c]
        return df

    def decode(self, c: str, values):
        return values * self.stds[c] + self.means[c]


PROCS = {"FillMissing": FillMissing, "Categorify": Categorify, "Normalize": Normalize}


def _make_procs(procs) -> list[TabularProc]:
    out = []
    for p in procs:
        if isinstance(p, str):
            if p not in PROCS:
                raise ValueError(f"unknown proc {p!r}; known: {', '.join(PROCS)}")
            p = PROCS[p]
        out.append(p() if isinstance(p, type) else p)
    if any(not isinstance(p, TabularProc) for p in out):
        raise TypeError(f"procs must be TabularProc instances, classes or names; got {procs}")
    return sorted(out, key=lambda p: p.order)


class TabularDataLoaders(DataLoaders):
    """``DataLoaders`` over a processed DataFrame; keeps what new data needs (``process``,
    ``test_dl``): the fitted ``procs``, ``cat_names`` (with the ``_na`` columns), ``cont_names``,
    ``classes`` (categories per categorical column) and ``vocab`` (the target's classes)."""

    @classmethod
    def from_df(cls, df, cat_names: Sequence[str] = (), cont_names: Sequence[str] = (),
                y_names: str | Sequence[str] = (), *, procs=("FillMissing", "Categorify",
                                                              "Normalize"),
                splits: tuple[Sequence[int], Sequence[int]] | None = None,
                valid_pct: float = 0.2, seed: int | None = None, stratify: bool = False,
                y_block: str | None = None, bs: int = 64, val_bs: int | None = None,
                shuffle: bool = True, drop_last: bool = False, sampler=None) -> TabularDataLoaders:
        """Loaders from ``df``: ``splits=(train_positions, valid_positions)`` (row positions),
        or ``valid_pct`` at random with ``seed`` (per target class with ``stratify``).
        ``y_block``: ``"category"`` (default for non-numeric targets: class indices, ``vocab``)
        or ``"regression"`` (default for numeric ones: float targets ``[N, len(y_names)]``)."""
        pd = _pd()
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"from_df takes a pandas DataFrame, got {type(df).__name__}")
        y_names = [y_names] if isinstance(y_names, str) else list(y_names)
        cat_names, cont_names = list(cat_names), list(cont_names)
        if not y_names:
            raise ValueError("from_df: name the target column(s) with y_names=")
        missing = [c for c in (*cat_names, *cont_names, *y_names) if c not in df.columns]
        if missing:
            raise ValueError(f"columns not in the DataFrame: {missing}; it has {list(df.columns)}")
        overlap = set(cat_names) & set(cont_names) | (set(y_names) & set(cat_names + cont_names))
        if overlap:
            raise ValueError(f"columns named twice (cat_names, cont_names, y_names): {sorted(overlap)}")
        df = df.reset_index(drop=True)
        if df[y_names].isna().any().any():
            raise ValueError(f"the target {y_names} has missing values: drop those rows first")
        numeric = all(pd.api.types.is_numeric_dtype(df[y]) and not pd.api.types.is_bool_dtype(df[y])
                      for y in y_names)
        y_block = y_block or ("regression" if numeric else "category")
        if y_block not in ("category", "regression"):
            raise ValueError(f"y_block must be 'category' or 'regression', got {y_block!r}")
        if y_block == "category" and len(y_names) != 1:
            raise ValueError("classification takes one target column")
        if splits is None:
            if stratify:
                splits = StratifiedSplitter(valid_pct, seed)(df[y_names[0]].astype(str).tolist())
            else:
                splits = RandomSplitter(valid_pct, seed)(len(df))
        train_idx, valid_idx = (list(s) for s in splits)
        if not train_idx:
            raise ValueError("the training split is empty")
        train_df = df.iloc[train_idx]
        tab = cls()
        tab.cat_names, tab.cont_names, tab.y_names, tab.y_block = cat_names, cont_names, y_names, y_block
        tab.classes = {}
        tab.procs = _make_procs(procs)
        for proc in tab.procs:  # each proc learns from the training rows as the earlier ones left them
            proc.setup(tab, train_df)
            train_df = proc(tab, train_df)
        if y_block == "category":
            tab.vocab = sorted(train_df[y_names[0]].unique().tolist(), key=str)
        train_ds = TensorDataset(*tab.process(df.iloc[train_idx]), tab._targets(df.iloc[train_idx]))
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        train = DataLoader(train_ds, batch_size=bs, shuffle=shuffle and sampler is None,
                           sampler=sampler, drop_last=drop_last, generator=g)
        valid = None
        if valid_idx:
            valid_ds = TensorDataset(*tab.process(df.iloc[valid_idx]), tab._targets(df.iloc[valid_idx]))
            valid = DataLoader(valid_ds, batch_size=val_bs or bs, shuffle=False)
        DataLoaders.__init__(tab, train, valid, n_inp=2, vocab=tab.vocab)
        return tab

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.procs: list[TabularProc] = []
        self.cat_names, self.cont_names, self.y_names = [], [], []
        self.classes: dict = {}
        self.y_block = "category"

    # -- processing new data ----------------------------------------------------------------
    def transform(self, df):
        """``df`` through the fitted procs (a new DataFrame)."""
        for proc in self.procs:
            df = proc(self, df)
        return df

    def process(self, df) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_cat, x_cont)`` tensors for the rows of ``df`` (which needs the input columns)."""
        raw = [c for c in self.cat_names + self.cont_names if not c.endswith("_na")
               or c[:-3] not in self.cont_names]
        missing = [c for c in raw if c not in df.columns]
        if missing:
            raise ValueError(f"the data lacks columns {missing}")
        df = self.transform(df)
        cats = df[self.cat_names].to_numpy(dtype=np.int64) if self.cat_names \
            else np.zeros((len(df), 0), np.int64)
        if self.cat_names and not any(isinstance(p, Categorify) for p in self.procs):
            raise ValueError("categorical columns need the Categorify proc")
        conts = df[self.cont_names].to_numpy(dtype=np.float32) if self.cont_names \
            else np.zeros((len(df), 0), np.float32)
        if np.isnan(conts).any():
            raise ValueError("continuous columns have missing values: put FillMissing in procs")
        return torch.tensor(cats), torch.tensor(conts)

    def _targets(self, df) -> torch.Tensor:
        if self.y_block == "category":
            index = {v: i for i, v in enumerate(self.vocab)}
            unknown = sorted({str(v) for v in df[self.y_names[0]] if v not in index})
            if unknown:
                raise ValueError(f"validation targets never seen in training: {unknown[:5]}")
            return torch.tensor([index[v] for v in df[self.y_names[0]]], dtype=torch.long)
        return torch.tensor(df[self.y_names].to_numpy(dtype=np.float32))

    def test_dl(self, items, bs: int = 64) -> Loader:
        """A loader over new rows: a DataFrame, or a list of rows (Series or dicts)."""
        pd = _pd()
        if not isinstance(items, pd.DataFrame):
            items = pd.DataFrame([dict(r) for r in items])
        cats, conts = self.process(items.reset_index(drop=True))
        return Loader(DataLoader(TensorDataset(cats, conts), batch_size=bs, shuffle=False),
                      self.after_batch)

    # -- showing ----------------------------------------------------------------------------
    def decode(self, x_cat: torch.Tensor, x_cont: torch.Tensor, y: torch.Tensor | None = None):
        """A DataFrame with categories and original units back (missing values show as filled)."""
        pd = _pd()
        data = {}
        for i, c in enumerate(self.cat_names):
            classes = self.classes.get(c)
            data[c] = [classes[int(k)] if classes else int(k) for k in x_cat[:, i]]
        norm = next((p for p in self.procs if isinstance(p, Normalize)), None)
        for i, c in enumerate(self.cont_names):
            v = x_cont[:, i].double().numpy()
            data[c] = norm.decode(c, v) if norm is not None else v
        if y is not None:
            if self.y_block == "category":
                data[self.y_names[0]] = [self.vocab[int(k)] for k in y]
            else:
                for i, c in enumerate(self.y_names):
                    data[c] = y.reshape(len(y), -1)[:, i].numpy()
        return pd.DataFrame(data)

    def show_batch(self, max_n: int = 10):
        """Print the first ``max_n`` training rows, decoded; returns them as a DataFrame."""
        if self.train is None:
            raise ValueError("these DataLoaders have no training loader")
        b = self.train.first()
        df = self.decode(*b[:3]).head(max_n)
        print(df.to_string(index=False))
        return df


__all__ = ["Categorify", "FillMissing", "Normalize", "TabularDataLoaders", "TabularProc"]


from mlx_train.tabular_model import (  # noqa: E402  (the model half, re-exported)
    TabularModel,
    emb_sz_rule,
    get_emb_sz,
    tabular_learner,
)

__all__ += ["TabularModel", "emb_sz_rule", "get_emb_sz", "tabular_learner"]
