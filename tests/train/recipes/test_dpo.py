"""The dpo recipe: preference data, the loss against TRL's DPOTrainer and the paper's formula,
and end to end on a tiny model (rewards move the right way, PEFT adapter out, resume)."""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from mlx_core import build_model, get_preset, load_model, load_tokenizer, save_model
from mlx_train import recipes
from mlx_train.lm_data import IGNORE_INDEX
from mlx_train.preference_data import (
    PairCollate,
    PreferencePair,
    preference_data,
    read_preferences,
    to_preference,
    tokenize_pair,
)
from mlx_train.recipes import components
from mlx_train.recipes.dpo import DPOLoss, PolicyOutput, PreferenceModel, sequence_logps

from .conftest import write_jsonl


def style_pairs(n=64, seed=0):
    """Two-word prompts; the chosen answer uses words w20-w39, the rejected one w40-w59 (a
    preference a tiny random model can learn in a few steps)."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        prompt, good, bad = rng.sample(range(60, 100), 2), rng.sample(range(20, 40), 2), \
            rng.sample(range(40, 60), 2)
        items.append({"prompt": " ".join(f"w{i}" for i in prompt),
                      "chosen": " ".join(f"w{i}" for i in good),
                      "rejected": " ".join(f"w{i}" for i in bad)})
    return items


@pytest.fixture
def prefs_jsonl(tmp_path):
    return write_jsonl(tmp_path / "prefs.jsonl", style_pairs())


@pytest.fixture
def dpo_overrides(tiny_model_dir, prefs_jsonl, tmp_path):
    return ["model=pretrained", f"model.source={tiny_model_dir}", "data=preference",
            f"data.train_files={prefs_jsonl}", "data.bs=8", "data.valid_pct=0.25",
            "train.progress=false",
            "logger=none", "optimizer.lr=1e-2", f"output_dir={tmp_path / 'run'}"]


def metrics_of(run):
    return json.loads((run / "metrics.json").read_text())


# -- data -----------------------------------------------------------------------------------
def test_pairs_tokenize_through_the_chat_template_with_labels_on_the_response(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)

    def response(ids, labels):
        return tok.hf.convert_ids_to_tokens([t for t, y in zip(ids, labels, strict=True)
                                             if y != IGNORE_INDEX])

    pair = to_preference({"prompt": "w20 w21", "chosen": "w21 w20", "rejected": "w20"})
    (c_ids, c_labels), (r_ids, r_labels) = tokenize_pair(tok, pair)
    # "<|im_start|>user w20 w21<|im_end|><|im_start|>assistant " + response + "<|im_end|>"
    assert response(c_ids, c_labels) == ["w21", "w20", "<|im_end|>"]
    assert response(r_ids, r_labels) == ["w20", "<|im_end|>"]
    assert c_ids[:7] == r_ids[:7] and c_labels[:7] == [IGNORE_INDEX] * 7   # the shared prompt
    # a chat prompt: the earlier assistant turn is context, not a response
    chat = to_preference({"prompt": [{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "hello"},
                                     {"role": "user", "content": "w30"}],
                          "chosen": [{"role": "assistant", "content": "w31"}], "rejected": "w32"})
    (ids, labels), _ = tokenize_pair(tok, chat)
    assert response(ids, labels) == ["w31", "<|im_end|>"]
    assert tok.hf.convert_tokens_to_ids("hello") in ids


def test_collate_puts_chosen_rows_then_rejected_rows(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    rows = [tokenize_pair(tok, to_preference(i)) for i in style_pairs(3)]
    from mlx_train.preference_data import PairDataset

    ds = PairDataset(rows, [None, (1.0, 2.0), None])
    ids, mask, labels, ref = PairCollate(0)([ds[i] for i in range(3)])
    assert ids.shape[0] == 6 and ref.shape == (3, 2)
    for i, ((c, cy), (r, ry)) in enumerate(rows):
        assert ids[i, :len(c)].tolist() == c and labels[i, :len(cy)].tolist() == cy
        assert ids[3 + i, :len(r)].tolist() == r and labels[3 + i, :len(ry)].tolist() == ry
        assert mask[3 + i].sum() == len(r) and (labels[3 + i, len(ry):] == IGNORE_INDEX).all()
    assert torch.isnan(ref[0]).all() and ref[1].tolist() == [1.0, 2.0]


@pytest.mark.parametrize("item, message", [
    ({"prompt": "a", "chosen": "b"}, r"missing \['rejected'\]"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "chosen": "c", "rejected": "d"}, "prompt ends with an assistant message"),
    ({"prompt": [{"role": "robot", "content": "a"}], "chosen": "c", "rejected": "d"}, "role"),
    ({"prompt": "a", "chosen": 3, "rejected": "d"}, "'chosen' must be a string"),
    ({"prompt": "a", "chosen": "c", "rejected": "d", "ref_chosen_logps": -1.0}, "but not the other"),
    ({"prompt": "a", "chosen": "c", "rejected": "d", "ref_chosen_logps": "x",
      "ref_rejected_logps": -1}, "finite numbers"),
])
def test_bad_pairs_are_refused_with_the_file_and_line(tmp_path, item, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [style_pairs(1)[0], item])
    with pytest.raises(ValueError, match=message) as e:
        read_preferences(path)
    assert f"{path}:2" in str(e.value)


def test_reference_data_requires_the_fields_and_truncation_drops_empty_pairs(tiny_model_dir,
                                                                           prefs_jsonl):
    with pytest.raises(ValueError, match="reference=data, but 64 of 64 pairs"):
        preference_data(str(tiny_model_dir), prefs_jsonl, require_reference_logps=True)
    data = preference_data(str(tiny_model_dir), prefs_jsonl, max_len=8)  # prompts are 7 tokens
    assert data.info["train_pairs"] + data.info["valid_pairs"] == 64 - data.info["dropped_pairs"]
    with pytest.raises(ValueError, match="raise data.max_len"):
        preference_data(str(tiny_model_dir), prefs_jsonl, max_len=6)


# -- the loss against references we did not write -------------------------------------------
def scaled_tiny_model(seed, directory, tokenizer):
    """A random tiny-llama with a sharpened head, so log-probs (and rewards) differ clearly."""
    torch.manual_seed(seed)
    model = build_model(get_preset("tiny-llama"))
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return save_model(model, directory, tokenizer=tokenizer, overwrite=True)


@pytest.mark.hf_parity
def test_sequence_logps_match_log_softmax_gather_on_hf_transformers_logits(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    path = scaled_tiny_model(0, tmp_path / "m", tiny_tokenizer)
    tok = load_tokenizer(path)
    items = [tokenize_pair(tok, to_preference(i)) for i in style_pairs(4)]
    from mlx_train.preference_data import PairDataset

    ds = PairDataset(items, [None] * 4)
    ids, mask, labels, _ = PairCollate(0)([ds[i] for i in range(4)])
    ours, n = sequence_logps(load_model(path)(ids, mask), labels)
    hf_logits = AutoModelForCausalLM.from_pretrained(path)(input_ids=ids, attention_mask=mask).logits
    keep = labels[:, 1:] != IGNORE_INDEX
    token = F.log_softmax(hf_logits[:, :-1].double(), -1).gather(
        -1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = (token * keep).sum(-1)
    assert n.tolist() == keep.sum(-1).tolist()
    assert expected.abs().min() > 5                       # not a trivially small number
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.hf_parity
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_and_rewards_match_trl(tmp_path, tiny_tokenizer, loss_type):
    """TRL's DPOTrainer computes the loss and the reward metrics on a batch made by TRL's own
    collator from our tokenized pairs; our PreferenceModel + DPOLoss on the zoo copies of the
    same two models must agree (and our collate must build the same batch)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from mlx_train.preference_data import PairDataset

    policy_dir = scaled_tiny_model(0, tmp_path / "policy", tiny_tokenizer)
    ref_dir = scaled_tiny_model(1, tmp_path / "ref", tiny_tokenizer)
    tok = load_tokenizer(policy_dir)
    pairs = [to_preference(i) for i in style_pairs(4, seed=1)]
    pairs[1] = PreferencePair(pairs[1].prompt, "w40 w41 w42", "w43")   # unequal lengths
    rows = [tokenize_pair(tok, p) for p in pairs]

    def split(row):
        ids, labels = row
        start = next(i for i, y in enumerate(labels) if y != IGNORE_INDEX)
        return ids[:start], ids[start:]

    examples = []
    for chosen, rejected in rows:
        prompt, c = split(chosen)
        assert split(rejected)[0] == prompt
        examples.append({"prompt_ids": prompt, "chosen_ids": c, "rejected_ids": split(rejected)[1]})
    batch = DataCollatorForPreference(pad_token_id=0)(examples)
    ds = PairDataset(rows, [None] * 4)
    ids, mask, labels, _ = PairCollate(0)([ds[i] for i in range(4)])
    assert torch.equal(ids, batch["input_ids"]) and torch.equal(mask, batch["attention_mask"])
    assert torch.equal(labels != IGNORE_INDEX, batch["completion_mask"].bool())

    beta = 0.1 if loss_type == "sigmoid" else 0.5
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, beta=beta,
                     loss_type=[loss_type], report_to=[], use_cpu=True,
                     gradient_checkpointing=False, bf16=False)  # TRL's default autocasts the ref
    dataset = Dataset.from_dict({"prompt": ["w20"], "chosen": ["w21"], "rejected": ["w22"]})
    tokenizer = tok.hf
    tokenizer.pad_token = tokenizer.pad_token or "<unk>"
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(policy_dir),
                         ref_model=AutoModelForCausalLM.from_pretrained(ref_dir), args=args,
                         train_dataset=dataset, processing_class=tokenizer)
    trainer.model.train()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(batch))
    trl = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    loss_fn = DPOLoss(beta=beta, loss_type=loss_type)
    pred = PreferenceModel(load_model(policy_dir), load_model(ref_dir))(ids, mask, labels)
    ours = loss_fn(pred, None)
    stats = loss_fn.stats(pred)
    assert abs(trl["rewards/margins"]) > 0.05                # the two models really differ
    torch.testing.assert_close(ours, trl_loss.float(), rtol=1e-4, atol=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert float(stats[key].mean()) == pytest.approx(trl[key], rel=1e-4, abs=1e-5), key
    chosen_logps = pred.logps[:4].detach().mean()
    assert float(chosen_logps) == pytest.approx(trl["logps/chosen"], rel=1e-4)


def test_cdpo_label_smoothing_and_ipo_follow_the_papers_formulas():
    """Independent scalar arithmetic: cDPO (Mitchell 2023) -(1-ε)·log σ(βΔ) - ε·log σ(-βΔ);
    IPO (Azar et al. 2023, TRL's length-normalised form) (Δ/len - 1/(2β))²; ε=0 is DPO's
    -log σ(βΔ) of Rafailov et al. 2023, eq. 7."""
    policy = [-10.0, -12.5, -30.0, -4.0]        # chosen (2 pairs), then rejected
    ref = [-11.0, -12.0, -29.0, -5.5]
    counts = [3, 5, 4, 2]
    pred = PolicyOutput(torch.tensor(policy), torch.tensor(counts), torch.tensor(ref))

    def sigma(x):
        return 1 / (1 + math.exp(-x))

    beta, eps = 0.3, 0.2
    deltas = [(policy[i] - ref[i]) - (policy[i + 2] - ref[i + 2]) for i in range(2)]
    cdpo = sum(-(1 - eps) * math.log(sigma(beta * d)) - eps * math.log(sigma(-beta * d))
               for d in deltas) / 2
    dpo = sum(-math.log(sigma(beta * d)) for d in deltas) / 2
    ipo = sum(((policy[i] - ref[i]) / counts[i] - (policy[i + 2] - ref[i + 2]) / counts[i + 2]
               - 1 / (2 * beta)) ** 2 for i in range(2)) / 2
    assert float(DPOLoss(beta, "sigmoid", eps)(pred)) == pytest.approx(cdpo, rel=1e-6)
    assert float(DPOLoss(beta)(pred)) == pytest.approx(dpo, rel=1e-6)
    assert float(DPOLoss(beta, "ipo")(pred)) == pytest.approx(ipo, rel=1e-6)
    stats = DPOLoss(beta).stats(pred)
    assert stats["rewards/chosen"].tolist() == pytest.approx([beta * 1.0, beta * -0.5])
    assert stats["rewards/accuracies"].tolist() == [1.0, 0.0]   # pair 2: rejected gained more
    with pytest.raises(ValueError, match="sigmoid .cDPO. only"):
        DPOLoss(beta, "ipo", 0.1)


# -- the recipe end to end ------------------------------------------------------------------
def test_dpo_moves_the_rewards_and_saves_a_peft_adapter(dpo_overrides, tiny_model_dir, tmp_path):
    from mlx_adapters import PeftModel

    metrics = recipes.run("dpo", [*dpo_overrides, "epochs=2", "eval.before=true", "logger=csv"])
    run = tmp_path / "run"
    assert metrics == metrics_of(run) and metrics["epochs"] == 2
    # a fresh LoRA adapter starts as the reference itself: every reward is 0
    assert metrics["rewards/margins_before"] == pytest.approx(0, abs=1e-5)
    assert metrics["rewards/accuracies_before"] == 0.0
    assert metrics["rewards/accuracies"] >= 0.8 and metrics["rewards/margins"] > 0.05
    assert metrics["rewards/chosen"] > metrics["rewards/rejected"]
    assert metrics["valid_loss"] < metrics["valid_loss_before"] == pytest.approx(math.log(2))
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    assert weights and all(".lora_" in k for k in weights)
    tuned = PeftModel.from_pretrained(load_model(tiny_model_dir), run / "adapter")
    ids = torch.tensor([[1, 3, 20, 21, 2, 1, 4]])
    assert not torch.allclose(tuned(ids), load_model(tiny_model_dir)(ids))
    assert "rewards/accuracies" in (run / "history.csv").read_text().splitlines()[0]


def test_dpo_resumes_a_crashed_run_exactly(dpo_overrides, tmp_path, monkeypatch):
    overrides = [*dpo_overrides, "epochs=2", "data.max_examples=32"]
    recipes.run("dpo", [*overrides, f"output_dir={tmp_path / 'whole'}"])
    save = components.LastCheckpoint.after_epoch

    def crash_after_first_epoch(self):
        save(self)
        if self.learn.epoch == 0:
            raise RuntimeError("power cut")

    monkeypatch.setattr(components.LastCheckpoint, "after_epoch", crash_after_first_epoch)
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="power cut"):
        recipes.run("dpo", [*overrides, f"output_dir={crashed}"])
    monkeypatch.undo()
    resumed = recipes.run("dpo", [*overrides, f"output_dir={crashed}", "resume=true"])
    assert resumed["epochs"] == 2
    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    again = load_file(crashed / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)
    assert resumed["rewards/margins"] == metrics_of(tmp_path / "whole")["rewards/margins"]


def test_reference_logps_from_the_data_train_like_the_reference_model(dpo_overrides,
                                                                      tiny_model_dir, tmp_path):
    """Reference log-probs precomputed by the base model into the file give the same run as
    computing them on the fly with the adapter disabled."""
    tok, base = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    items = style_pairs()
    for item in items:
        (c, cy), (r, ry) = tokenize_pair(tok, to_preference(item))
        with torch.no_grad():
            for key, ids, labels in (("ref_chosen_logps", c, cy), ("ref_rejected_logps", r, ry)):
                logps, _ = sequence_logps(base(torch.tensor([ids])), torch.tensor([labels]))
                item[key] = float(logps)
    with_ref = write_jsonl(tmp_path / "with_ref.jsonl", items)
    dpo_overrides = [*dpo_overrides, "data.max_examples=32"]
    on_the_fly = recipes.run("dpo", [*dpo_overrides, f"output_dir={tmp_path / 'a'}"])
    from_data = recipes.run("dpo", [*dpo_overrides, f"data.train_files={with_ref}",
                                    "reference=data", f"output_dir={tmp_path / 'b'}"])
    for key in ("train_loss", "valid_loss", "rewards/margins", "rewards/accuracies"):
        assert from_data[key] == pytest.approx(on_the_fly[key], rel=1e-3, abs=1e-4), key
    with pytest.raises(ValueError, match="ref_chosen_logps / ref_rejected_logps"):
        recipes.run("dpo", [*dpo_overrides, "reference=data", f"output_dir={tmp_path / 'c'}"])


def test_full_dpo_uses_a_frozen_copy_as_reference_and_saves_an_hf_model(dpo_overrides, tmp_path,
                                                                       tiny_model_dir):
    metrics = recipes.run("dpo", [*dpo_overrides, "adapter=none", "optimizer.lr=1e-3",
                                  "eval.before=true", "loss.loss_type=ipo", "loss.beta=0.5"])
    saved = tmp_path / "run" / "model"
    assert metrics["saved"] == str(saved) and (saved / "config.json").is_file()
    assert metrics["rewards/margins_before"] == pytest.approx(0, abs=1e-5)
    assert metrics["rewards/margins"] > 0 and metrics["valid_loss"] < metrics["valid_loss_before"]
    tuned, base = load_model(saved), load_model(tiny_model_dir)
    assert not torch.equal(tuned.lm_head.weight, base.lm_head.weight)


def test_config_errors_come_before_any_work(dpo_overrides, tmp_path):
    from mlx_train.recipes import RecipeConfigError

    with pytest.raises(RecipeConfigError, match="expects one of 'ipo', 'sigmoid'"):
        recipes.compose("dpo", [*dpo_overrides, "loss.loss_type=hinge"])
    with pytest.raises(RecipeConfigError, match="Did you mean: loss.beta"):
        recipes.compose("dpo", [*dpo_overrides, "loss.betaa=0.2"])
    with pytest.raises(ValueError, match="reference must be 'model'"):
        recipes.run("dpo", [*dpo_overrides, "reference=teacher"])
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        recipes.run("dpo", [*dpo_overrides, "loss.label_smoothing=0.7"])
    assert not (tmp_path / "run").exists()


def test_mlx_train_dpo_and_recipes_show(dpo_overrides, tmp_path):
    from mlx_core.cli.app import build_app

    runner = CliRunner()
    shown = runner.invoke(build_app(), ["recipes", "show", "dpo", "loss.beta=0.2"])
    assert shown.exit_code == 0 and "beta: 0.2" in shown.output and "reference: model" in shown.output
    done = runner.invoke(build_app(), ["train", "dpo", *dpo_overrides, "save.checkpoint_every=0"],
                         env={"COLUMNS": "250"})
    assert done.exit_code == 0, done.output
    assert "rewards/accuracies" in metrics_of(tmp_path / "run")


def test_step_metrics_rows_carry_the_training_batches_rewards(dpo_overrides, tmp_path):
    import csv

    recipes.run("dpo", [*dpo_overrides, "epochs=2", "logger=default", "logger.log_every=1",
                        "logger.tensorboard=false", "save.checkpoint_every=0"])
    with open(tmp_path / "run" / "train_metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 6  # 48 training pairs, 8 a batch: a row per step
    keys = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
    assert set(keys) <= set(rows[0]) and {"loss", "lr", "grad_norm"} <= set(rows[0])
    for row in rows:
        chosen, rejected, accuracy, margin = (float(row[k]) for k in keys)
        assert 0 <= accuracy <= 1
        assert margin == pytest.approx(chosen - rejected, rel=1e-5, abs=1e-6)
    # the first batch's loss is taken before any update: the fresh adapter is the reference
    assert float(rows[0]["rewards/margins"]) == pytest.approx(0, abs=1e-6)
    assert float(rows[-1]["rewards/margins"]) > 0.05 and float(rows[-1]["rewards/accuracies"]) > 0.5
