"""Tabular: procs against hand-computed statistics, entity-embedding sizes, the penguins to
>= 0.95 species accuracy on a held-out split, predictions on raw rows, regression."""

import math

import numpy as np
import pytest
import torch
from torch import nn

pd = pytest.importorskip("pandas")

from mlx_train import accuracy, rmse  # noqa: E402
from mlx_train.tabular import (  # noqa: E402
    TabularDataLoaders,
    TabularModel,
    emb_sz_rule,
    get_emb_sz,
    tabular_learner,
)


def _frame():
    return pd.DataFrame({
        "colour": ["red", "blue", None, "red", "green", "blue", "red", "blue"],
        "size": [1.0, np.nan, 3.0, 4.0, np.nan, 6.0, 7.0, 100.0],
        "weight": [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0],
        "y": ["a", "b", "a", "b", "a", "b", "a", "b"],
    })


def test_procs_learn_from_the_training_rows_only():
    df = _frame()
    dls = TabularDataLoaders.from_df(df, ["colour"], ["size", "weight"], "y",
                                     splits=([0, 1, 2, 3, 4, 5], [6, 7]), bs=8)
    assert dls.cat_names == ["colour", "size_na"] and dls.cont_names == ["size", "weight"]
    assert dls.classes["colour"] == ["#na#", "blue", "green", "red"]
    assert dls.classes["size_na"] == ["#na#", False, True] and dls.vocab == ["a", "b"]
    fill = dls.procs[0]
    assert fill.na_dict["size"] == 3.5  # median of the training sizes 1, 3, 4, 6 (7 and 100 are valid)
    train_size = np.array([1.0, 3.5, 3.0, 4.0, 3.5, 6.0])
    mean, std = train_size.mean(), train_size.std() + 1e-7
    cat, cont, y = dls.train.first()
    assert cat.tolist() == [[3, 1], [1, 2], [0, 1], [3, 1], [2, 2], [1, 1]]
    assert np.allclose(cont[:, 0].numpy(), (train_size - mean) / std, atol=1e-5)
    vcat, vcont, vy = next(iter(dls.valid))  # validation: the training statistics
    assert np.allclose(vcont[:, 0].numpy(), (np.array([7.0, 100.0]) - mean) / std, atol=1e-4)
    w = np.arange(10.0, 70.0, 10.0)
    assert np.allclose(vcont[:, 1].numpy(), (np.array([70.0, 80.0]) - w.mean()) / (w.std() + 1e-7),
                       atol=1e-5)
    assert vy.tolist() == [0, 1] and y.tolist() == [0, 1, 0, 1, 0, 1]
    # new data: an unseen category and a missing value map to #na# and the training median
    new = pd.DataFrame({"colour": ["purple"], "size": [np.nan], "weight": [10.0]})
    c, x = dls.process(new)
    assert c.tolist() == [[0, 2]] and x[0, 0].item() == pytest.approx((3.5 - mean) / std, abs=1e-5)
    shown = dls.show_batch(3)
    assert shown["colour"].tolist() == ["red", "blue", "#na#"]
    assert shown["size"].tolist() == pytest.approx([1.0, 3.5, 3.0], abs=1e-4)


def test_embedding_sizes_follow_fastais_rule():
    assert [emb_sz_rule(n) for n in (2, 3, 4, 10, 100, 1000, 10**6)] == \
        [min(600, round(1.6 * n**0.56)) for n in (2, 3, 4, 10, 100, 1000, 10**6)]
    assert emb_sz_rule(3) == 3 and emb_sz_rule(100) == 21 and emb_sz_rule(10**6) == 600
    dls = TabularDataLoaders.from_df(_frame(), ["colour"], ["size", "weight"], "y",
                                     splits=(range(6), range(6, 8)))
    assert get_emb_sz(dls) == [(4, emb_sz_rule(4)), (3, emb_sz_rule(3))]
    assert get_emb_sz(dls, {"colour": 7}) == [(4, 7), (3, 3)]
    with pytest.raises(ValueError, match="not categorical"):
        get_emb_sz(dls, {"weight": 3})


def test_tabular_model_layout():
    model = TabularModel([(4, 3), (3, 2)], n_cont=2, out_sz=3, layers=[8, 6], ps=0.1)
    kinds = [type(m).__name__ for m in model.layers]
    assert kinds == ["Linear", "ReLU", "BatchNorm1d", "Dropout", "Linear", "ReLU", "BatchNorm1d",
                     "Dropout", "Linear"]
    assert model.layers[0].in_features == 3 + 2 + 2 and model.layers[0].bias is None
    assert isinstance(model.bn_cont, nn.BatchNorm1d)
    out = model(torch.tensor([[1, 2], [3, 0]]), torch.randn(2, 2))
    assert out.shape == (2, 3)
    with pytest.raises(ValueError, match="x_cat has 1 columns"):
        model(torch.tensor([[1]]), torch.randn(1, 2))


def test_penguins_species_accuracy_on_a_held_out_split():
    penguins = pytest.importorskip("palmerpenguins")
    df = penguins.load_penguins()
    assert df.isna().any().any()  # missing values in categoricals and continuous columns
    dls = TabularDataLoaders.from_df(
        df, cat_names=["island", "sex"],
        cont_names=["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g"],
        y_names="species", valid_pct=0.25, seed=42, bs=32)
    assert "sex" in dls.cat_names and "bill_length_mm_na" in dls.cat_names
    torch.manual_seed(0)
    learn = tabular_learner(dls, layers=[200, 100], metrics=accuracy, progress=False)
    assert learn.model.embeds[0].embedding_dim == emb_sz_rule(4)  # island: 3 + #na#
    with learn.no_logging():
        learn.fit_one_cycle(5, 1e-2)
    acc = learn.recorder.values[-1][-1]
    print(f"penguins held-out species accuracy: {acc:.4f} on {len(dls.valid.dataset)} rows")
    assert acc >= 0.95
    label, idx, probs = learn.predict(df.iloc[0])  # a raw row (an Adelie)
    assert label == "Adelie" and probs.shape == (3,)
    preds, _ = learn.get_preds(dl=dls.test_dl(df.iloc[:5]))
    assert preds.shape == (5, 3)


def test_regression_target_and_errors():
    g = np.random.default_rng(0)
    df = pd.DataFrame({"a": g.normal(size=200), "b": g.choice(["x", "y"], size=200)})
    df["t"] = 3 * df["a"] + (df["b"] == "y") * 2.0
    dls = TabularDataLoaders.from_df(df, ["b"], ["a"], "t", valid_pct=0.2, seed=0, bs=32)
    assert dls.y_block == "regression" and dls.vocab is None
    torch.manual_seed(0)
    learn = tabular_learner(dls, layers=[32], metrics=rmse, progress=False, y_range=(-12, 12))
    with learn.no_logging():
        learn.fit_one_cycle(8, 3e-2)
    assert learn.recorder.values[-1][-1] < 0.5 * df["t"].std()
    with pytest.raises(ValueError, match="columns not in the DataFrame"):
        TabularDataLoaders.from_df(df, ["nope"], ["a"], "t")
    with pytest.raises(ValueError, match="columns named twice"):
        TabularDataLoaders.from_df(df, ["b"], ["a", "b"], "t")
    bad = df.copy()
    bad.loc[0, "t"] = math.nan
    with pytest.raises(ValueError, match="missing values"):
        TabularDataLoaders.from_df(bad, ["b"], ["a"], "t")
    with pytest.raises(TypeError, match="pandas DataFrame"):
        TabularDataLoaders.from_df({"a": [1]}, [], ["a"], "t")
    with pytest.raises(ValueError, match="unknown proc"):
        TabularDataLoaders.from_df(df, ["b"], ["a"], "t", procs=["Bucketize"])
