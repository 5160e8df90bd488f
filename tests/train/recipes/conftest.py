"""Fixtures for the recipe tests: tiny models, tiny instruction data, overrides for fast runs."""

import json
import random

import pytest


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return path


@pytest.fixture
def tiny_jsonl(tmp_path):
    """64 alpaca-style items over the tiny tokenizer's words: answer = the two words swapped."""
    rng = random.Random(0)
    items = []
    for _ in range(64):
        a, b = rng.randrange(20, 60), rng.randrange(20, 60)
        items.append({"instruction": f"w{a} w{b}", "output": f"w{b} w{a}"})
    return write_jsonl(tmp_path / "train.jsonl", items)


@pytest.fixture
def tiny_overrides(tiny_model_dir, tiny_jsonl, tmp_path):
    """Overrides that make any fine-tuning recipe run in about a second."""
    return ["model=pretrained", f"model.source={tiny_model_dir}", "data=instruct",
            f"data.train_files={tiny_jsonl}", "data.bs=16", "eval.max_new_tokens=4",
            "eval.samples=0", "train.progress=false", f"output_dir={tmp_path / 'run'}"]


@pytest.fixture
def single_process_env(monkeypatch):
    """For tests that compare several processes with one: the in-process reference run must
    not think it is a torchrun worker, and the workers get a thread each."""
    from mlx_train.runner.launch import TORCHRUN_ENV

    for key in TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
