"""The ``classify`` recipe end to end on small generated data: a table, labelled texts and a folder
of PNGs; accuracy well above chance, the files a run writes, resuming and clear errors."""

import json
import random

import pytest
import torch

from mlx_train import load_learner, recipes
from mlx_train.recipes import RecipeConfigError
from mlx_train.recipes.classify_data import load_table_procs

pd = pytest.importorskip("pandas")

FAST = ["train.progress=false", "logger.tensorboard=false"]  # TensorBoard: in test_train_metrics


def metrics_of(run):
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture
def table_csv(tmp_path):
    """3 classes from a continuous score plus a categorical shift, with missing values."""
    rng = random.Random(0)
    rows = []
    for _ in range(360):
        x1, x2 = rng.gauss(0, 1), rng.gauss(0, 1)
        colour = rng.choice(["red", "green", "blue"])
        score = x1 + 0.5 * x2 + {"red": -1.5, "green": 0.0, "blue": 1.5}[colour]
        label = "low" if score < -0.7 else "mid" if score < 0.7 else "high"
        rows.append({"x1": None if rng.random() < 0.05 else x1, "x2": x2, "colour": colour,
                     "noise": rng.random(), "label": label})
    path = tmp_path / "table.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_table_trains_exports_and_resumes(table_csv, tmp_path):
    run = tmp_path / "run"
    overrides = ["data=table", f"data.path={table_csv}", "data.target=label", "epochs=4",
                 "data.bs=32", "optimizer.lr=3e-2",
                 f"output_dir={run}", "logger.log_every=5", *FAST]
    metrics = recipes.run("classify", overrides)
    assert metrics == metrics_of(run)
    assert metrics["accuracy"] > 0.8 and metrics["f1_macro"] > 0.75  # chance: 1/3
    assert metrics["classes"] == ["high", "low", "mid"] and metrics["epochs"] == 4
    assert metrics["n_train"] + metrics["n_valid"] == 360
    files = {p.name for p in run.iterdir()}
    assert {"config.yaml", "metrics.json", "export.safetensors", "table_procs.json",
            "history.csv", "train_metrics.csv", "checkpoints"} <= files
    assert len((run / "history.csv").read_text().splitlines()) == 5
    steps = (run / "train_metrics.csv").read_text().splitlines()
    assert steps[0].startswith("step,epoch,loss,lr,grad_norm,items_per_s,peak_mem_mib")

    # the export rebuilds the model by itself; table_procs.json turns raw rows into its inputs
    inference = load_learner(run / "export.safetensors")
    assert inference.dls.vocab == ["high", "low", "mid"]
    procs = load_table_procs(run / "table_procs.json")
    df = pd.read_csv(table_csv)
    preds, _, decoded = inference.get_preds(dl=procs.test_dl(df), with_decoded=True)
    predicted = [inference.dls.vocab[int(i)] for i in decoded]
    assert preds.shape == (360, 3)
    assert sum(p == t for p, t in zip(predicted, df["label"], strict=True)) / 360 > 0.8

    with pytest.raises(FileExistsError, match="resume=true"):
        recipes.run("classify", overrides)
    more = recipes.run("classify", [*overrides, "epochs=6", "resume=true"])
    assert more["epochs"] == 6 and more["accuracy"] > 0.8
    assert len((run / "history.csv").read_text().splitlines()) == 7  # appended, one header
    rows = (run / "train_metrics.csv").read_text().splitlines()
    assert len(rows) > len(steps) and sum(r.startswith("step,") for r in rows) == 1


def test_resume_continues_exactly(table_csv, tmp_path):
    """1 epoch, then resumed to 2, ends where an uninterrupted 2-epoch run does (a constant lr:
    a schedule over 1 epoch differs from one over 2)."""
    base = ["data=table", f"data.path={table_csv}", "data.target=label", "scheduler=constant",
            "optimizer.lr=3e-3", "logger=none", "train.progress=false"]
    whole = recipes.run("classify", [*base, "epochs=2", f"output_dir={tmp_path / 'a'}"])
    recipes.run("classify", [*base, "epochs=1", f"output_dir={tmp_path / 'b'}"])
    resumed = recipes.run("classify", [*base, "epochs=2", f"output_dir={tmp_path / 'b'}",
                                       "resume=true"])
    assert resumed["epochs"] == 2
    assert resumed["valid_loss"] == pytest.approx(whole["valid_loss"], rel=1e-5)
    assert resumed["accuracy"] == whole["accuracy"]


@pytest.fixture
def texts_jsonl(tmp_path):
    """Two topics told apart by their words, among shared filler words."""
    rng = random.Random(0)
    topics = {"sport": ["ball", "goal", "team", "match", "coach", "score"],
              "food": ["bread", "soup", "salt", "cook", "meal", "spice"]}
    filler = ["the", "a", "was", "very", "and", "then", "we", "saw"]
    lines = []
    for i in range(240):
        label = "sport" if i % 2 else "food"
        words = [rng.choice(filler) for _ in range(rng.randrange(4, 9))]
        for _ in range(2):
            words.insert(rng.randrange(len(words) + 1), rng.choice(topics[label]))
        lines.append(json.dumps({"sentence": " ".join(words), "topic": label}))
    path = tmp_path / "texts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_text_classification_with_a_random_preset(texts_jsonl, tmp_path):
    run = tmp_path / "run"
    metrics = recipes.run("classify", [
        "data=text_classification", f"data.path={texts_jsonl}", "data.text_col=sentence",
        "data.label_col=topic", "data.vocab_size=300", "data.bs=16", "epochs=3",
        "optimizer.lr=3e-3", f"output_dir={run}", *FAST])
    assert metrics["accuracy"] > 0.9 and metrics["classes"] == ["food", "sport"]  # chance: 1/2
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    steps = (run / "train_metrics.csv").read_text().splitlines()
    assert "tokens_per_s" in steps[0]
    inference = load_learner(run / "export.safetensors")  # a TextClassifier, rebuilt
    from mlx_core.tokenizer import Tokenizer
    from mlx_train.text import TextDataLoaders

    tok = Tokenizer.from_dir(run / "tokenizer")
    dls = TextDataLoaders.from_texts(["we saw the goal and the team", "the soup was salt"],
                                     ["sport", "food"], tok, splits=([0, 1], []),
                                     vocab=["food", "sport"])
    ids, mask, _ = dls.train.first()
    inference.model.eval()
    with torch.no_grad():
        assert inference.model(ids, mask).argmax(-1).tolist() == [1, 0]  # sport, food


def test_image_folder(tmp_path):
    pytest.importorskip("PIL")
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("horizontal", "vertical"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(24):
            stripes = np.zeros((16, 16), np.float32)
            stripes[rng.integers(0, 2)::4] = 1.0
            img = stripes if label == "horizontal" else stripes.T
            img = np.clip(img + 0.3 * rng.standard_normal((16, 16)), 0, 1)
            Image.fromarray((img * 255).astype(np.uint8)).convert("RGB").save(
                tmp_path / "images" / label / f"{i}.png")
    run = tmp_path / "run"
    metrics = recipes.run("classify", [
        "data=image_folder", f"data.path={tmp_path / 'images'}", "data.bs=8", "epochs=3",
        "learner.vision.lin_ftrs=[32]", "optimizer.lr=3e-3", f"output_dir={run}", *FAST])
    assert metrics["accuracy"] >= 0.8 and metrics["classes"] == ["horizontal", "vertical"]
    inference = load_learner(run / "export.safetensors")
    assert [type(t).__name__ for t in inference.dls.after_batch] == ["Normalize"]


def test_wrong_keys_and_data_fail_clearly(table_csv, tmp_path):
    base = ["data=table", f"data.path={table_csv}", "data.target=label",
            f"output_dir={tmp_path / 'bad'}", *FAST]
    with pytest.raises(RecipeConfigError, match="Did you mean: learner.tabular.layers"):
        recipes.compose("classify", [*base, "learner.tabular.layerz=[8]"])
    with pytest.raises(RecipeConfigError, match="missing required value.*data.target"):
        recipes.compose("classify", ["data=table", "data.path=x.csv"])
    with pytest.raises(RecipeConfigError, match="Available options in 'data'"):
        recipes.compose("classify", ["data=tabel"])
    with pytest.raises(ValueError, match=r"data.target='lable' is not a column.*'label'"):
        recipes.run("classify", [*base, "data.target=lable"])
    with pytest.raises(FileNotFoundError, match="data.path=nope.csv: no such file"):
        recipes.run("classify", [*base, "data.path=nope.csv", f"output_dir={tmp_path / 'b2'}"])
    with pytest.raises(ValueError, match="does not make classification data.*data=table"):
        recipes.run("classify", ["data=text_folder", f"data.path={tmp_path}",
                                 f"output_dir={tmp_path / 'b3'}", *FAST])
    with pytest.raises(ValueError, match="a single example"):
        one = tmp_path / "one.csv"
        pd.DataFrame({"x": [1.0, 2.0, 3.0], "y": ["a", "a", "b"]}).to_csv(one, index=False)
        recipes.run("classify", ["data=table", f"data.path={one}", "data.target=y",
                                 f"output_dir={tmp_path / 'b4'}", *FAST])
