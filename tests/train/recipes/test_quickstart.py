"""`mlx quickstart`: the synthetic task, exact-match scoring, and the command end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mlx_core import load_model, load_tokenizer
from mlx_core.cli.app import build_app
from mlx_train import recipes
from mlx_train.lm_data import EvalExample, to_messages
from mlx_train.quickstart import free_output_dir, overrides
from mlx_train.recipes.evaluate import exact_match, generate_answers, normalize_answer
from mlx_train.recipes.tasks import CODE_BOOK, encode, secret_code_data, secret_code_items


def test_secret_code_items_are_deterministic_and_held_out():
    train, valid = secret_code_items(600, 48, seed=3)
    assert (train, valid) == secret_code_items(600, 48, seed=3)
    assert secret_code_items(600, 48, seed=4)[1] != valid
    words = {i["instruction"] for i in valid}
    assert len(words) == 48 and not words & {i["instruction"] for i in train}
    assert len(train) == 600                                  # more than the 464 left: repeats
    for item in train[:20] + valid:
        source = item["instruction"].removeprefix("Encode: ").split()
        assert len(source) == 3 and item["output"] == " ".join(CODE_BOOK[w] for w in source)
    assert encode(["red", "sun"]) == f"{CODE_BOOK['red']} {CODE_BOOK['sun']}"
    assert set(CODE_BOOK.values()).isdisjoint(CODE_BOOK)      # codes never equal a source word
    with pytest.raises(ValueError, match="leaves no training"):
        secret_code_items(10, 512)


def test_secret_code_data_holds_out_scored_examples(tiny_tokenizer):
    data = secret_code_data(tiny_tokenizer, n_train=32, n_valid=8, bs=8)
    assert len(data.eval_examples) == 8 and data.info["train_examples"] == 32
    ex = data.eval_examples[0]
    assert ex.messages[0]["role"] == "system" and ex.answer == ex.messages[-1]["content"]


def test_exact_match_scores_greedy_answers(tiny_model_dir):
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    convs = [to_messages({"instruction": f"w{i} w{i + 1}", "output": "x"}) for i in range(20, 26)]
    answers = generate_answers(model, tok, convs, max_new_tokens=3, bs=4)
    single = generate_answers(model, tok, convs[:1], max_new_tokens=3)
    assert answers[0] == single[0] and all(isinstance(a, str) for a in answers)
    right = [EvalExample(c, f"  {a} ") for c, a in zip(convs[:4], answers, strict=False)]
    wrong = [EvalExample(c, "w99 not it") for c in convs[4:]]
    acc, got = exact_match(model, tok, right + wrong, max_new_tokens=3)
    assert acc == pytest.approx(4 / 6) and got == answers
    assert normalize_answer(" fish \n cat  ") == "fish cat"
    with pytest.raises(ValueError, match="needs examples"):
        exact_match(model, tok, [])


def test_quickstart_overrides_compose_into_a_valid_lora_config(tmp_path):
    cfg = recipes.compose("lora_finetune", overrides(48, tmp_path / "qs", False, "smollm2-135m-instruct"))
    assert cfg.data.n_train == 384 and cfg.data.n_valid == 48 and cfg.eval.before
    assert cfg.model.source == "smollm2-135m-instruct" and cfg.adapter.r == 16
    quick = recipes.compose("lora_finetune", overrides(6, tmp_path / "q s", True, "my dir/m,1"))
    assert quick.data.n_train == 48 and quick.model.source == "my dir/m,1"   # quoted for Hydra
    assert quick.output_dir == str(tmp_path / "q s")
    with pytest.raises(ValueError, match="--steps"):
        overrides(0, tmp_path, False, "m")


def test_free_output_dir_numbers_taken_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert free_output_dir() == Path("mlx-quickstart")
    Path("mlx-quickstart").mkdir()
    Path("mlx-quickstart-2").mkdir()
    assert free_output_dir() == Path("mlx-quickstart-3")


def test_quickstart_command_on_a_tiny_model(tiny_model_dir, tmp_path):
    done = CliRunner().invoke(build_app(), ["quickstart", "--quick", "--steps", "2", "--model",
                                            str(tiny_model_dir), "--output", str(tmp_path / "qs")],
                              env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    for text in ("exact match before training", "exact match after training", "base model:",
                 "with adapter:", "exact match, with adapter", "total time"):
        assert text in done.output
    metrics = json.loads((tmp_path / "qs" / "metrics.json").read_text())
    assert {"base_exact_match", "exact_match", "valid_loss"} <= set(metrics)
    assert (tmp_path / "qs" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "qs" / "checkpoints").exists()     # no training state for the demo


@pytest.mark.builtin_model
@pytest.mark.slow
def test_mlx_quickstart_quick_on_the_builtin_model(tmp_path):
    from mlx_adapters import PeftModel

    out = tmp_path / "qs"
    mlx = Path(sys.executable).parent / "mlx"
    done = subprocess.run([str(mlx), "quickstart", "--quick", "--output", str(out)],
                          capture_output=True, text=True, timeout=1500, cwd=tmp_path,
                          env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stdout + done.stderr
    for text in ("exact match before training", "exact match after training", "base model:",
                 "with adapter:", "exact match, base model", "adapter (PEFT format)"):
        assert text in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["base_exact_match"] <= 1 and 0 <= metrics["exact_match"] <= 1
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "smollm2-135m-instruct" and config["r"] == 16
    tuned = PeftModel.from_pretrained(load_model("smollm2-135m-instruct"), out / "adapter")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert not torch.allclose(tuned(ids), load_model("smollm2-135m-instruct")(ids))
