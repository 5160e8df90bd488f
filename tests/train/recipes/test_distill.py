"""The distill recipe: the KD loss against torch's F.kl_div / F.cross_entropy on full logits, the
frozen teacher, the vocabulary check, and end to end on tiny models (the student's KL to the
teacher drops; HF model out; resume)."""

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from mlx_core import build_model, get_preset, load_model, save_model
from mlx_train import recipes
from mlx_train.lm_data import IGNORE_INDEX
from mlx_train.recipes.distill import DistillModel, DistillOutput, KDLoss, forward_kl


def masked_labels(b, t, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, : t // 3] = IGNORE_INDEX        # a prompt
    labels[0, -2:] = IGNORE_INDEX             # padding
    return labels


def reference_kd(student, teacher, labels, kd_ratio, temperature):
    """The same loss from torch's own F.kl_div and F.cross_entropy on the FULL logits, masked
    afterwards (the recipe selects the response rows first)."""
    s, t, y = student[:, :-1], teacher[:, :-1], labels[:, 1:]
    keep = (y != IGNORE_INDEX).float()
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                  log_target=True, reduction="none").sum(-1)
    kl = (kl * keep).sum() / keep.sum() * temperature ** 2
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX)
    return (1 - kd_ratio) * ce + kd_ratio * kl


@pytest.mark.parametrize("kd_ratio, temperature", [(1.0, 1.0), (0.5, 2.0), (0.0, 1.0), (0.3, 0.7)])
def test_kd_loss_matches_torch_kl_div_and_cross_entropy(kd_ratio, temperature):
    b, t, v = 3, 11, 37
    g = torch.Generator().manual_seed(1)
    student = (3 * torch.randn(b, t, v, generator=g)).requires_grad_()
    teacher = 3 * torch.randn(b, t, v, generator=g)
    labels = masked_labels(b, t, v)
    ours = KDLoss(kd_ratio, temperature)(DistillOutput(student, teacher), labels)
    (grad_ours,) = torch.autograd.grad(ours, student)
    ref = reference_kd(student, teacher, labels, kd_ratio, temperature)
    (grad_ref,) = torch.autograd.grad(ref, student)
    # float32 throughout: a few ulps of the ~1e0 loss; gradients are ~1e-2
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-4, atol=1e-7)


def test_forward_kl_is_zero_for_equal_distributions_and_ignores_impossible_tokens():
    logits = torch.randn(5, 9)
    assert forward_kl(logits, logits).abs().max() < 1e-6
    teacher = logits.clone()
    teacher[:, :3] = float("-inf")             # tokens the teacher never emits
    ref = F.kl_div(F.log_softmax(logits, -1)[:, 3:], F.log_softmax(teacher, -1)[:, 3:],
                   log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(forward_kl(logits, teacher), ref)
    assert torch.isfinite(forward_kl(logits, teacher)).all()


def test_kd_metrics_report_the_kl_at_temperature_one():
    g = torch.Generator().manual_seed(2)
    pred = DistillOutput(torch.randn(2, 6, 10, generator=g), torch.randn(2, 6, 10, generator=g))
    labels = masked_labels(2, 6, 10)
    loss = KDLoss(0.5, temperature=4.0)
    loss(pred, labels)
    stats = loss.stats(pred, labels)
    expected = reference_kd(pred.student, pred.teacher, labels, 1.0, 1.0)
    assert stats["kl"] / stats["tokens"] == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="kd_ratio must be in"):
        KDLoss(1.5)


def test_the_teacher_stays_frozen_in_eval_mode_and_out_of_the_checkpoint():
    torch.manual_seed(0)
    student, teacher = build_model(get_preset("tiny-llama")), build_model(get_preset("tiny-llama"))
    teacher.train()
    model = DistillModel(student, teacher).train()
    ids = torch.randint(0, 128, (2, 8))
    out = model(ids, torch.ones_like(ids))
    KDLoss(0.5)(out, ids).backward()
    assert not teacher.training and not out.teacher.requires_grad
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(k.startswith("student.") for k in model.state_dict())
    assert sum(1 for _ in model.parameters()) == sum(1 for _ in student.parameters())


# -- the recipe end to end ------------------------------------------------------------------
def sharp_tiny_model(seed, directory, tokenizer, vocab_size=None):
    """A random tiny-llama with a sharpened head: confident, context-dependent predictions."""
    torch.manual_seed(seed)
    config = get_preset("tiny-llama")
    if vocab_size:
        import dataclasses

        config = dataclasses.replace(config, vocab_size=vocab_size)
    model = build_model(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return save_model(model, directory, tokenizer=tokenizer, overwrite=True)


@pytest.fixture
def teacher_dir(tmp_path, tiny_tokenizer):
    return sharp_tiny_model(1, tmp_path / "teacher", tiny_tokenizer)


@pytest.fixture
def kd_overrides(teacher_dir, tiny_jsonl, tmp_path):
    """A random tiny-llama student (tokenizer: the teacher's) learning from the teacher."""
    return ["model=tiny-llama", f"teacher.source={teacher_dir}", "data=instruct",
            f"data.train_files={tiny_jsonl}", "data.bs=16", "eval.exact_match=false",
            "train.progress=false", "logger=none", "optimizer.lr=1e-2",
            f"output_dir={tmp_path / 'run'}"]


def test_distill_brings_the_student_closer_to_the_teacher(kd_overrides, tmp_path, teacher_dir):
    metrics = recipes.run("distill", [*kd_overrides, "epochs=3", "eval.before=true",
                                      "loss.kd_ratio=0.9", "logger=csv"])
    run = tmp_path / "run"
    assert metrics == json.loads((run / "metrics.json").read_text()) and metrics["epochs"] == 3
    assert metrics["kl"] < 0.7 * metrics["kl_before"], metrics          # measured: 3.26 -> 1.75
    assert metrics["valid_loss"] < metrics["valid_loss_before"]
    history = (run / "history.csv").read_text().splitlines()
    kls = [float(row.split(",")[history[0].split(",").index("kl")]) for row in history[1:]]
    assert kls == sorted(kls, reverse=True)                       # every epoch closer
    student = load_model(run / "model")
    assert student.config.num_layers == 2 and (run / "model" / "tokenizer.json").is_file()
    teacher = load_model(teacher_dir)
    ids = torch.tensor([[1, 3, 20, 21, 2, 1, 4]])
    with torch.no_grad():
        kl = forward_kl(student(ids)[0], teacher(ids)[0]).mean()
    assert kl < metrics["kl_before"]


def test_distill_resumes(kd_overrides, tmp_path):
    first = recipes.run("distill", [*kd_overrides, "epochs=1"])
    with pytest.raises(FileExistsError, match="resume=true"):
        recipes.run("distill", [*kd_overrides, "epochs=2"])
    resumed = recipes.run("distill", [*kd_overrides, "epochs=2", "resume=true"])
    assert first["epochs"] == 1 and resumed["epochs"] == 2
    assert resumed["kl"] < first["kl"]


def test_distill_with_a_lora_student_saves_an_adapter(kd_overrides, tiny_model_dir, tmp_path):
    metrics = recipes.run("distill", [*kd_overrides, "model=pretrained",
                                      f"model.source={tiny_model_dir}", "adapter=lora",
                                      "adapter.r=4", "loss.temperature=2.0"])
    assert metrics["saved"] == str(tmp_path / "run" / "adapter")
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_a_teacher_with_another_vocabulary_is_refused(kd_overrides, tmp_path, tiny_tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bigger = sharp_tiny_model(1, tmp_path / "bigger", tiny_tokenizer, vocab_size=160)
    with pytest.raises(ValueError, match=r"student's vocabulary has 128 tokens and the teacher's "
                                         r"160.*model.overrides.vocab_size=160"):
        recipes.run("distill", [*kd_overrides, f"teacher.source={bigger}",
                                f"tokenizer={tmp_path / 'teacher'}", f"output_dir={tmp_path / 'a'}"])
    # the same size, but the ids mean other words
    vocab = tiny_tokenizer.get_vocab()
    words = sorted(vocab, key=vocab.get)
    shuffled = words[:11] + list(reversed(words[11:]))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(shuffled)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                    bos_token="<|im_start|>", eos_token="<|im_end|>")
    other.chat_template = tiny_tokenizer.chat_template
    foreign = sharp_tiny_model(1, tmp_path / "foreign", other)
    with pytest.raises(ValueError, match="maps tokens to ids differently"):
        recipes.run("distill", [*kd_overrides, f"teacher.source={foreign}",
                                f"tokenizer={tmp_path / 'teacher'}", f"output_dir={tmp_path / 'b'}"])


def test_config_errors_come_before_any_work(kd_overrides, tmp_path):
    from mlx_train.recipes import RecipeConfigError

    with pytest.raises(RecipeConfigError, match="Did you mean: loss.temperature"):
        recipes.compose("distill", [*kd_overrides, "loss.temprature=2"])
    with pytest.raises(RecipeConfigError, match="expects float"):
        recipes.compose("distill", [*kd_overrides, "loss.kd_ratio=half"])
    with pytest.raises(ValueError, match="kd_ratio must be in"):
        recipes.run("distill", [*kd_overrides, "loss.kd_ratio=1.5"])
    assert not (tmp_path / "run").exists()


def test_mlx_train_distill_and_recipes_show(kd_overrides, tmp_path):
    from mlx_core.cli.app import build_app

    runner = CliRunner()
    shown = runner.invoke(build_app(), ["recipes", "show", "distill", "loss.temperature=2"])
    assert shown.exit_code == 0 and "temperature: 2" in shown.output
    assert "source: smollm2-135m-instruct" in shown.output          # the default teacher
    done = runner.invoke(build_app(), ["train", "distill", *kd_overrides, "save.checkpoint_every=0"],
                         env={"COLUMNS": "250"})
    assert done.exit_code == 0, done.output
    assert "kl" in json.loads((tmp_path / "run" / "metrics.json").read_text())
