"""The data of the ``classify`` recipe: a table, a folder of images or labelled texts, read from
files into the ``DataLoaders`` the matching learner takes (the config group ``data``: ``table``,
``image_folder``, ``text_classification``).

Each builder returns a ``ClassifyData``: the loaders, which learner they go with (``kind``) and a
summary to print. Splits are seeded and stratified (every class in both splits, in proportion),
so a resumed run rebuilds the same split.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}
KINDS = ("tabular", "vision", "text")


@dataclass
class ClassifyData:
    """``dls`` for the learner of ``kind`` (``tabular``, ``vision`` or ``text``); ``tokenizer``
    for text; ``info``: what to print about the data."""

    dls: object
    kind: str
    info: dict = field(default_factory=dict)
    tokenizer: object = None

    @property
    def classes(self) -> list:
        return list(self.dls.vocab or [])


def _file(path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"data.path={path}: no such file (the {what})")
    return p


def read_records(path, what: str = "data"):
    """A pandas DataFrame from a ``.csv`` / ``.tsv`` table or a ``.jsonl`` file (one JSON object
    per line)."""
    from mlx_train.tabular import _pd

    pd = _pd()
    p = _file(path, what)
    suffix = p.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        return pd.read_csv(p, sep=TABLE_SUFFIXES[suffix])
    if suffix in (".jsonl", ".json"):
        try:
            return pd.DataFrame([json.loads(line) for line in p.read_text().splitlines()
                                 if line.strip()])
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not JSON lines ({e}); write one JSON object per line") from None
    raise ValueError(f"{p}: unknown file type {suffix!r}; use .csv, .tsv or .jsonl")


def _check_column(df, name: str, key: str, path) -> None:
    if name not in df.columns:
        raise ValueError(f"{key}={name!r} is not a column of {path}; its columns are "
                         f"{list(df.columns)}")


def _check_classes(labels, key: str) -> None:
    counts = labels.value_counts()
    if len(counts) < 2:
        raise ValueError(f"{key}: the data has {len(counts)} class(es); classification needs 2 "
                         "or more")
    if counts.min() < 2:
        rare = counts[counts < 2].index.tolist()[:5]
        raise ValueError(f"{key}: classes {rare} have a single example; a stratified split needs "
                         "at least 2 per class (drop them or add examples)")


def table_data(path, target: str, cat_names: list[str] | None = None,
               cont_names: list[str] | None = None, valid_pct: float = 0.2, bs: int = 64,
               seed: int = 0, fill_missing: bool = True, max_categories: int = 0) -> ClassifyData:
    """A table (``.csv``, ``.tsv``, ``.jsonl``; read with pandas) with the class in column
    ``target``. ``cat_names`` / ``cont_names``: the categorical and continuous input columns;
    when both are null, every other column is used: numeric ones as continuous, the rest (text,
    booleans) as categorical, and also integer columns with at most ``max_categories`` distinct
    values. Missing values are filled (training medians, plus ``<col>_na`` flags) with
    ``fill_missing``; continuous columns are normalised with training statistics."""
    from mlx_train.tabular import TabularDataLoaders, _pd

    pd = _pd()
    df = read_records(path, "table")
    _check_column(df, target, "data.target", path)
    if df[target].isna().any():
        n = int(df[target].isna().sum())
        raise ValueError(f"data.target={target!r}: {n} row(s) have no class; drop them first")
    if cat_names is None and cont_names is None:
        cat_names, cont_names = [], []
        for c in df.columns:
            if c == target:
                continue
            col = df[c]
            numeric = pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)
            few = pd.api.types.is_integer_dtype(col) and col.nunique() <= max_categories
            (cont_names if numeric and not few else cat_names).append(c)
    cat_names, cont_names = list(cat_names or []), list(cont_names or [])
    for key, names in (("data.cat_names", cat_names), ("data.cont_names", cont_names)):
        for c in names:
            _check_column(df, c, key, path)
    if not cat_names and not cont_names:
        raise ValueError(f"{path}: no input columns besides data.target={target!r}")
    _check_classes(df[target].astype(str), "data.target")
    procs = ["FillMissing", "Categorify", "Normalize"] if fill_missing else ["Categorify", "Normalize"]
    dls = TabularDataLoaders.from_df(df, cat_names, cont_names, target, procs=procs,
                                     valid_pct=valid_pct, seed=seed, stratify=True,
                                     y_block="category", bs=bs)
    info = {"rows": len(df), "train": len(dls.train.dataset), "valid": len(dls.valid.dataset),
            "classes": len(dls.vocab), "categorical": len(dls.cat_names),
            "continuous": len(dls.cont_names)}
    return ClassifyData(dls, "tabular", info)


# -- what a table's new rows need: the procs' training statistics, as JSON ---------------------
def save_table_procs(dls, path) -> Path:
    """Write what ``TabularDataLoaders.test_dl`` needs to process new rows (the columns, the
    fitted ``FillMissing`` / ``Categorify`` / ``Normalize`` statistics, the classes) to ``path``
    as JSON: the tabular export holds the model, this holds the preprocessing."""
    from mlx_train.tabular import Categorify, FillMissing, Normalize

    procs = []
    for p in dls.procs:
        if isinstance(p, FillMissing):
            procs.append({"type": "FillMissing", "fill_strategy": p.fill_strategy,
                          "fill_val": p.fill_val, "add_col": p.add_col, "na_dict": p.na_dict,
                          "na_cols": p.na_cols})
        elif isinstance(p, Categorify):
            procs.append({"type": "Categorify", "classes": p.classes})
        elif isinstance(p, Normalize):
            procs.append({"type": "Normalize", "means": p.means, "stds": p.stds})
        else:
            raise TypeError(f"cannot save the proc {p!r} (FillMissing, Categorify, Normalize are "
                            "saved)")
    state = {"cat_names": dls.cat_names, "cont_names": dls.cont_names, "y_names": dls.y_names,
             "vocab": dls.vocab, "procs": procs}
    path = Path(path)
    path.write_text(json.dumps(state, indent=1))
    return path


def load_table_procs(path):
    """``TabularDataLoaders`` without data, with the procs saved by ``save_table_procs``: its
    ``test_dl(df)`` turns new rows into batches for the exported model (``load_learner``)."""
    from mlx_train.tabular import Categorify, FillMissing, Normalize, TabularDataLoaders

    state = json.loads(Path(path).read_text())
    dls = TabularDataLoaders(n_inp=2, vocab=state["vocab"])
    dls.cat_names, dls.cont_names = state["cat_names"], state["cont_names"]
    dls.y_names, dls.vocab = state["y_names"], state["vocab"]
    for d in state["procs"]:
        kind = d.pop("type")
        if kind == "FillMissing":
            p = FillMissing(d["fill_strategy"], d["fill_val"], d["add_col"])
            p.na_dict, p.na_cols = d["na_dict"], d["na_cols"]
        elif kind == "Categorify":
            p = Categorify()
            p.classes = dls.classes = d["classes"]
        else:
            p = Normalize()
            p.means, p.stds = d["means"], d["stds"]
        dls.procs.append(p)
    return dls


def image_folder_data(path, size: int | None = None, valid_pct: float = 0.2, bs: int = 32,
                      seed: int = 0, mode: str = "RGB", augment: bool = False,
                      flip: bool = True) -> ClassifyData:
    """Images in class sub-folders: ``path/<class>/*.png`` (split by ``valid_pct``), or
    ``path/train/<class>/...`` and ``path/valid/<class>/...``. ``size`` resizes every image
    to ``size`` x ``size`` (needed when their sizes differ); ``mode``: ``RGB`` or ``L`` (grey).
    ``augment``: fastai-style augmentation of training batches (``flip``: mirror them too)."""
    from mlx_train.augment import aug_transforms
    from mlx_train.vision_data import ImageDataLoaders

    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.path={path}: no such folder (expected class sub-folders)")
    tfms = aug_transforms(flip=flip, seed=seed) if augment else ()
    dls = ImageDataLoaders.from_folder(root, size=size, mode=mode, valid_pct=valid_pct, seed=seed,
                                       stratify=True, bs=bs, batch_tfms=tfms)
    if len(dls.vocab) < 2:
        raise ValueError(f"data.path={path}: found {len(dls.vocab)} class folder(s); "
                         "classification needs 2 or more")
    x = dls.train.dataset.tensors[0]
    info = {"train": len(dls.train.dataset),
            "valid": len(dls.valid.dataset) if dls.valid is not None else 0,
            "classes": len(dls.vocab), "image": "x".join(map(str, x.shape[1:]))}
    return ClassifyData(dls, "vision", info)


def text_data(tokenizer, path, text_col: str = "text", label_col: str = "label",
              valid_pct: float = 0.2, bs: int = 32, max_len: int = 256, seed: int = 0,
              vocab_size: int = 512) -> ClassifyData:
    """Labelled texts: a ``.csv`` / ``.tsv`` / ``.jsonl`` file with columns ``text_col`` and
    ``label_col``. ``tokenizer=None`` (the recipe's choice for a randomly initialised model)
    trains a byte-level BPE of ``vocab_size`` on the training file first. Texts are cut to
    ``max_len`` tokens; training batches group similar lengths."""
    from mlx_train.lm_data import as_tokenizer, train_bpe_tokenizer
    from mlx_train.text import TextDataLoaders

    df = read_records(path, "labelled texts")
    _check_column(df, text_col, "data.text_col", path)
    _check_column(df, label_col, "data.label_col", path)
    df = df.dropna(subset=[text_col, label_col])
    texts = df[text_col].astype(str).tolist()
    labels = df[label_col].astype(str).tolist()
    if any(not t.strip() for t in texts):
        raise ValueError(f"{path}: some {text_col!r} values are empty; drop those rows")
    _check_classes(df[label_col].astype(str), "data.label_col")
    if tokenizer is None:
        with tempfile.TemporaryDirectory() as tmp:  # the BPE trainer reads files
            corpus = Path(tmp) / "texts.txt"
            corpus.write_text("\n".join(texts))
            tokenizer = train_bpe_tokenizer([corpus], vocab_size)
    else:
        tokenizer = as_tokenizer(tokenizer)
    dls = TextDataLoaders.from_texts(texts, labels, tokenizer, max_len=max_len,
                                     valid_pct=valid_pct, seed=seed, stratify=True, bs=bs)
    info = {"texts": len(texts), "train": len(dls.train.dataset),
            "valid": len(dls.valid.dataset) if dls.valid is not None else 0,
            "classes": len(dls.vocab), "tokenizer_vocab": tokenizer.vocab_size}
    return ClassifyData(dls, "text", info, tokenizer)


__all__ = ["KINDS", "ClassifyData", "image_folder_data", "load_table_procs", "read_records",
           "save_table_procs", "table_data", "text_data"]
