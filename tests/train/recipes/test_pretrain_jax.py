"""``pretrain`` with ``backend=jax``: the same run as the torch Learner's (same data, initial
weights, AdamW, 1cycle lr and beta1, clipping), so the two backends must agree."""

import json

import numpy as np
import pytest
import torch

from mlx_core import load_model
from mlx_train import recipes

pytest.importorskip("mlx_jax", reason="backend=jax needs mlx-jax (pip install -e packages/jax_backend)")


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("texts")
    (folder / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    (folder / "b.txt").write_text("pack my box with five dozen liquor jugs. " * 40)
    return folder


def _run(texts, out, *extra):
    return recipes.run("pretrain", [f"data.path={texts}", "data.seq_len=32", "data.vocab_size=300",
                                    "epochs=2", "optimizer.lr=1e-2", "train.progress=false",
                                    f"output_dir={out}", *extra])


def test_jax_backend_matches_the_torch_learner(texts, tmp_path):
    theirs = _run(texts, tmp_path / "torch")
    ours = _run(texts, tmp_path / "jax", "backend=jax")
    assert ours["backend"] == "jax" and ours["epochs"] == 2
    # fp32 on both sides, 8 AdamW steps: only XLA vs ATen rounding differs (measured: 2e-7)
    for key in ("train_loss", "valid_loss"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key
    assert ours["valid_loss"] < 0.6 * np.log(300)  # it learned the text
    a, b = load_model(tmp_path / "jax" / "model"), load_model(tmp_path / "torch" / "model")
    ids = torch.tensor([[5, 17, 42, 99, 3, 8]])
    with torch.no_grad():
        assert (a(ids) - b(ids)).abs().max() < 1e-4
    jax_rows = (tmp_path / "jax" / "history.csv").read_text().splitlines()
    assert jax_rows[0] == "epoch,train_loss,valid_loss,perplexity,time" and len(jax_rows) == 3
    assert json.loads((tmp_path / "jax" / "metrics.json").read_text())["backend"] == "jax"


def test_jax_backend_resumes_exactly(texts, tmp_path, monkeypatch):
    from mlx_train.recipes import pretrain_jax

    whole = _run(texts, tmp_path / "whole", "backend=jax")
    save = pretrain_jax._save_checkpoint

    def save_then_crash(*args):
        save(*args)
        raise KeyboardInterrupt  # the run dies right after its first checkpoint

    monkeypatch.setattr(pretrain_jax, "_save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        _run(texts, tmp_path / "split", "backend=jax")
    monkeypatch.setattr(pretrain_jax, "_save_checkpoint", save)
    with pytest.raises(FileExistsError, match="resume=true"):
        _run(texts, tmp_path / "split", "backend=jax")
    resumed = _run(texts, tmp_path / "split", "backend=jax", "resume=true")
    assert resumed["epochs"] == 2
    for key in ("train_loss", "valid_loss"):
        assert resumed[key] == whole[key], key  # the same steps on the same state: bit for bit
    with pytest.raises(ValueError, match="mlx-train-jax-state"):  # the torch path names the format
        _run(texts, tmp_path / "split", "resume=true", "epochs=3")


def test_jax_backend_refuses_what_it_cannot_do(texts, tmp_path):
    with pytest.raises(ValueError, match="backend=jax trains with AdamW"):
        _run(texts, tmp_path / "sgd", "backend=jax", "optimizer=sgd")
    with pytest.raises(ValueError, match="backend must be 'torch' or 'jax'"):
        _run(texts, tmp_path / "other", "backend=tf")


def test_jax_backend_writes_the_step_metrics_of_the_torch_path(texts, tmp_path):
    import csv
    import math

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def rows_of(run):
        with open(run / "train_metrics.csv", newline="") as f:
            return list(csv.DictReader(f))

    _run(texts, tmp_path / "torch", "logger.log_every=1")
    _run(texts, tmp_path / "jax", "backend=jax", "logger.log_every=1")
    theirs, ours = rows_of(tmp_path / "torch"), rows_of(tmp_path / "jax")
    assert list(ours[0]) == list(theirs[0]) == ["step", "epoch", "loss", "lr", "grad_norm",
                                                "tokens_per_s", "peak_mem_mib"]
    assert [r["step"] for r in ours] == [str(i) for i in range(1, 9)]  # 2 epochs of 4 steps
    assert [r["epoch"] for r in ours] == [r["epoch"] for r in theirs] == ["0"] * 4 + ["1"] * 4
    for a, b in zip(ours, theirs, strict=True):
        assert math.isfinite(float(a["loss"])) and math.isfinite(float(a["lr"]))
        assert float(a["tokens_per_s"]) > 0 and float(a["peak_mem_mib"]) > 0
        for key in ("loss", "lr", "grad_norm"):  # the same run, so the same values
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4), (a["step"], key)
    events = EventAccumulator(str(tmp_path / "jax" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/grad_norm")] == list(range(1, 9))
