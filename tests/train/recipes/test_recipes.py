"""The recipes end to end on tiny models: outputs, evaluation, resume, sweeps, `mlx tune`."""

import json
import re
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mlx_core import load_model
from mlx_core.cli.app import build_app
from mlx_train import CancelFitException, recipes
from mlx_train.recipes import components

runner = CliRunner()


def mlx(*args):
    return runner.invoke(build_app(), [str(a) for a in args], env={"COLUMNS": "250"})


def metrics_of(run):
    return json.loads((run / "metrics.json").read_text())


def test_lora_finetune_saves_a_peft_adapter_and_scores_it(tiny_overrides, tiny_model_dir, tmp_path):
    from mlx_adapters import PeftModel

    metrics = recipes.run("lora_finetune", [*tiny_overrides, "epochs=2", "eval.before=true",
                                            "adapter.r=4", "optimizer.lr=1e-2"])
    run = tmp_path / "run"
    assert metrics == metrics_of(run) and metrics["epochs"] == 2
    assert 0 <= metrics["exact_match"] <= 1 and "base_exact_match" in metrics
    assert metrics["valid_loss"] < metrics_of_initial_loss(tiny_model_dir, tiny_overrides)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    assert weights and all(".lora_" in k for k in weights)
    tuned = PeftModel.from_pretrained(load_model(tiny_model_dir), run / "adapter")
    ids = torch.tensor([[1, 3, 20, 21, 2]])
    assert not torch.allclose(tuned(ids), load_model(tiny_model_dir)(ids))
    assert (run / "checkpoints" / "last.safetensors").is_file()
    assert (run / "config.yaml").is_file() and len((run / "history.csv").read_text().splitlines()) == 3


def metrics_of_initial_loss(model_dir, overrides):
    """The untrained model's validation loss on the same split."""
    from mlx_train import CausalLMLoss, Learner
    from mlx_train.lm_data import instruction_data

    cfg = recipes.compose("lora_finetune", overrides)
    data = instruction_data(str(model_dir), cfg.data.train_files, bs=16, seed=cfg.seed)
    learn = Learner(data.dls, load_model(model_dir), CausalLMLoss(), progress=False)
    return learn.validate()[0]


def test_full_finetune_saves_an_hf_model(tiny_overrides, tiny_model_dir, tmp_path):
    metrics = recipes.run("full_finetune", [*tiny_overrides, "optimizer.lr=1e-3"])
    saved = tmp_path / "run" / "model"
    assert metrics["saved"] == str(saved)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in saved.iterdir()}
    tuned, base = load_model(saved), load_model(tiny_model_dir)
    assert not torch.equal(tuned.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_qlora_finetune_quantizes_the_base(tiny_overrides, tmp_path, monkeypatch):
    from mlx_adapters import NF4Linear
    from mlx_train.recipes import finetune

    seen = {}
    original = finetune.prepare_model

    def spy(cfg, tokenizer):
        model = original(cfg, tokenizer)
        seen["nf4"] = sum(isinstance(m, NF4Linear) for m in model.modules())
        return model

    monkeypatch.setattr(finetune, "prepare_model", spy)
    metrics = recipes.run("qlora_finetune", tiny_overrides)
    assert seen["nf4"] > 0 and (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert metrics["valid_loss"] > 0


def test_resume_continues_exactly_where_a_crashed_run_stopped(tiny_overrides, tmp_path, monkeypatch):
    overrides = [*tiny_overrides, "epochs=3", "data.bs=8", "eval.exact_match=false"]
    recipes.run("lora_finetune", [*overrides, f"output_dir={tmp_path / 'whole'}"])

    save = components.LastCheckpoint.after_epoch

    def crash_after_first_epoch(self):
        save(self)
        if self.learn.epoch == 0:
            raise RuntimeError("power cut")

    monkeypatch.setattr(components.LastCheckpoint, "after_epoch", crash_after_first_epoch)
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="power cut"):
        recipes.run("lora_finetune", [*overrides, f"output_dir={crashed}"])
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="resume=true"):
        recipes.run("lora_finetune", [*overrides, f"output_dir={crashed}"])
    resumed = recipes.run("lora_finetune", [*overrides, f"output_dir={crashed}", "resume=true"])
    assert resumed["epochs"] == 3
    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    again = load_file(crashed / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == again.keys()
    assert all(torch.equal(whole[k], again[k]) for k in whole)          # bit for bit on CPU
    assert resumed["valid_loss"] == metrics_of(tmp_path / "whole")["valid_loss"]
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        recipes.run("lora_finetune", [*overrides, f"output_dir={tmp_path / 'new'}", "resume=true"])


def test_pretrain_from_a_text_folder(tmp_path):
    import math

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 60)
    (texts / "b.txt").write_text("pack my box with five dozen liquor jugs. " * 60)
    run = tmp_path / "pre"
    metrics = recipes.run("pretrain", [f"data.path={texts}", "data.seq_len=32", "data.vocab_size=300",
                                       "epochs=3", "optimizer.lr=1e-2", "train.progress=false",
                                       f"output_dir={run}"])
    model = load_model(run / "model")
    assert model.config.vocab_size <= 300 and model.config.num_layers == 2
    assert metrics["valid_loss"] < 0.5 * math.log(model.config.vocab_size)   # it learned the text
    from mlx_core import load_tokenizer

    tok = load_tokenizer(run / "model")
    assert tok.decode(tok.encode("the lazy dog")) == "the lazy dog"


def test_pretrain_backend_jax_without_mlx_jax_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlx_jax", None)  # as if mlx-jax were not installed
    run = tmp_path / "pre"
    with pytest.raises(ImportError, match=r"pip install 'mlx-train\[jax\]'"):
        recipes.run("pretrain", [f"data.path={tmp_path}", "backend=jax", f"output_dir={run}"])
    assert not run.exists()  # refused before any work


def test_sweep_runs_every_combination_and_prints_a_table(tiny_overrides, tmp_path):
    done = mlx("train", "lora_finetune", *tiny_overrides, "-m", "optimizer.lr=1e-3,1e-2",
               "adapter.r=2,4", "eval.exact_match=false", "save.checkpoint_every=0")
    assert done.exit_code == 0, done.output
    for i, (lr, r) in enumerate([("0.001", 2), ("0.001", 4), ("0.01", 2), ("0.01", 4)]):
        run = tmp_path / "run" / str(i)
        assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == r
        assert f"lr: {float(lr)}" in (run / "config.yaml").read_text()
        loss = json.loads((run / "metrics.json").read_text())["valid_loss"]
        row = re.search(rf"│ {i} +│ {lr} +│ {r} +│ [\d.]+ +│ ([\d.]+) +│.*│ ok +│ {run} +│",
                        done.output)
        assert row and float(row.group(1)) == pytest.approx(loss, rel=1e-3), done.output
    assert re.search(r"┃ # +┃ optimizer.lr +┃ adapter.r +┃ train_loss +┃ valid_loss", done.output)
    bad = mlx("train", "lora_finetune", *tiny_overrides, "-m", "optimizer.lr=1e-3,oops")
    assert bad.exit_code == 1 and "sweep job 1" in bad.output and "expects float" in bad.output


def test_tune_lora_is_train_lora_finetune(tiny_overrides, tmp_path):
    a = mlx("tune", "lora", *tiny_overrides, f"output_dir={tmp_path / 'a'}", "eval.exact_match=false")
    b = mlx("train", "lora_finetune", *tiny_overrides, f"output_dir={tmp_path / 'b'}",
            "eval.exact_match=false")
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    wa = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_tune_dpo_and_tune_distill_run_their_recipes(tiny_overrides, tiny_model_dir, tmp_path):
    from mlx_train.recipes import TUNE_ALIASES

    assert TUNE_ALIASES["dpo"] == "dpo" and TUNE_ALIASES["distill"] == "distill"
    listed = mlx("tune", "--help")
    assert listed.exit_code == 0 and "dpo" in listed.output and "distill" in listed.output
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1}", "chosen": f"w{i + 1} w{i}",
                                         "rejected": f"w{i} w{i + 1}"}) + "\n"
                             for i in range(20, 44)))
    fast = [o for o in tiny_overrides if o.startswith(("model", "train.", "eval."))]
    dpo = mlx("tune", "dpo", *fast, "data=preference", f"data.train_files={pairs}", "data.bs=8",
              "logger=none", f"output_dir={tmp_path / 'dpo'}")
    assert dpo.exit_code == 0, dpo.output
    assert {"rewards/accuracies", "rewards/margins"} <= set(metrics_of(tmp_path / "dpo"))
    assert (tmp_path / "dpo" / "adapter" / "adapter_config.json").is_file()
    distill = mlx("tune", "distill", f"teacher.source={tiny_model_dir}", "model=tiny-llama",
                  *[o for o in tiny_overrides if o.startswith(("data", "train.", "eval."))],
                  "eval.exact_match=false", "logger=none", f"output_dir={tmp_path / 'kd'}")
    assert distill.exit_code == 0, distill.output
    assert "kl" in metrics_of(tmp_path / "kd")


def test_checkpoint_layers_reaches_the_model(tiny_overrides):
    from mlx_core.models.transformer import Backbone
    from mlx_train.recipes.finetune import prepare_model, resolve_tokenizer

    cfg = recipes.compose("lora_finetune", [*tiny_overrides, "train.gradient_checkpointing=true",
                                            "train.checkpoint_layers=1"])
    model = prepare_model(cfg, resolve_tokenizer(cfg))
    [backbone] = [m for m in model.modules() if isinstance(m, Backbone)]
    assert backbone.gradient_checkpointing and backbone.checkpoint_layers == 1


def test_quantize_without_an_adapter_is_refused(tiny_overrides):
    with pytest.raises(ValueError, match="needs an adapter"):
        recipes.run("full_finetune", [*tiny_overrides, "quantize=nf4"])


def test_cancelled_fit_still_saves(tiny_overrides, tmp_path, monkeypatch):
    """A fit the Learner cancels (e.g. early stopping) still evaluates and saves."""
    def stop(self):
        raise CancelFitException()

    monkeypatch.setattr(components.LastCheckpoint, "after_epoch", stop)
    metrics = recipes.run("lora_finetune", [*tiny_overrides, "epochs=2"])
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert metrics["epochs"] == 1
