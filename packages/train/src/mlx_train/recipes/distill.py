"""``distill``: knowledge distillation (as torchtune's knowledge_distillation recipes) over the
Learner.

config -> tokenizer -> instruction data (``mlx_train.lm_data``, as the fine-tuning recipes) ->
teacher (frozen, eval mode, no grads) + student (full by default, or with ``adapter=lora``) ->
``DistillModel`` (both models' logits) -> Learner with ``KDLoss`` -> ``run_dir/model`` (HF
format) or ``run_dir/adapter`` (PEFT).

Loss per response token (labels != -100, shifted by one as ``CausalLMLoss``):
``(1 - kd_ratio) * CE(student, labels) + kd_ratio * T² * KL(p_teacher^T || p_student^T)``,
where ``p^T = softmax(logits / T)`` (Hinton et al. 2015: the T² keeps the gradient scale of the
soft targets independent of T). The KL is the true forward KL (teacher entropy included, so it
is 0 when the student matches); torchtune's ``ForwardKLLoss`` drops the entropy term, which
does not change the gradient. Teacher and student must share a vocabulary (checked).

Validation metrics: ``kl`` (forward KL at T = 1, per response token), ``ce`` (the student's
cross-entropy on the labels) and ``perplexity`` (exp of ``ce``).
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from mlx_train.lm_data import IGNORE_INDEX
from mlx_train.metrics import Metric
from mlx_train.recipes.base import (
    CHECKPOINT_DIR,
    RunDir,
    announce_logs,
    evaluate_exact_match,
    final_metrics,
    fit,
    has_node,
    last_values,
    metrics_before,
    optimizer_and_lr,
    save_trained,
    say,
    seed_everything,
    training_callbacks,
    write_metrics,
)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """``KL(softmax(t / T) || softmax(s / T))`` per row (summed over the vocabulary), in fp32.
    Tokens the teacher gives probability 0 (e.g. -inf logits) add nothing."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    p_t = log_t.exp()
    return torch.where(p_t > 0, p_t * (log_t - log_s), 0.0).sum(-1)


@dataclass(eq=False)
class DistillOutput:
    """``learn.pred``: the student's logits (with grad) and the teacher's (without)."""

    student: torch.Tensor
    teacher: torch.Tensor


class DistillModel(nn.Module):
    """``forward(input_ids, attention_mask) -> DistillOutput`` for the Learner.

    The teacher is kept outside the module tree: it is never trained or checkpointed (a resumed
    run loads it again from its source), and the Learner's ``model.train()`` does not reach it,
    so it stays in eval mode; its forward runs under ``torch.no_grad``.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        self.student = student
        teacher.eval().requires_grad_(False)
        self.__dict__["teacher"] = teacher

    def forward(self, input_ids, attention_mask=None) -> DistillOutput:
        teacher = self.teacher
        if next(teacher.parameters()).device != input_ids.device:
            teacher.to(input_ids.device)
        with torch.no_grad():
            teacher_logits = teacher(input_ids, attention_mask)
        return DistillOutput(self.student(input_ids, attention_mask), teacher_logits)


class KDLoss(nn.Module):
    """``(1 - kd_ratio) * CE + kd_ratio * T² * forward KL`` over the response tokens (see the
    module docstring); ``stats(pred, labels)``: summed ``kl`` (at T = 1), ``ce`` and the token
    count, for the metrics."""

    def __init__(self, kd_ratio: float = 0.5, temperature: float = 1.0):
        super().__init__()
        if not 0 <= kd_ratio <= 1:
            raise ValueError(f"loss.kd_ratio must be in [0, 1], got {kd_ratio}")
        if not temperature > 0:
            raise ValueError(f"loss.temperature must be > 0, got {temperature}")
        self.kd_ratio, self.temperature = kd_ratio, temperature
        self._last = None  # (weakref to the pred, its stats): the metrics reuse them

    @staticmethod
    def response_rows(pred: DistillOutput, labels: torch.Tensor):
        """The student's and teacher's logits ``[N, V]`` at the N positions that predict a
        response token, and those tokens ``[N]``."""
        if pred.student.shape != pred.teacher.shape:
            raise ValueError(f"student logits {tuple(pred.student.shape)} and teacher logits "
                             f"{tuple(pred.teacher.shape)} differ: they need one vocabulary")
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        return pred.student[:, :-1][keep], pred.teacher[:, :-1][keep], targets[keep]

    def forward(self, pred: DistillOutput, labels: torch.Tensor) -> torch.Tensor:
        student, teacher, targets = self.response_rows(pred, labels)
        ce = F.cross_entropy(student.float(), targets, reduction="none")
        kl = forward_kl(student, teacher, self.temperature)
        loss = (1 - self.kd_ratio) * ce.mean() + self.kd_ratio * self.temperature ** 2 * kl.mean()
        if self.temperature != 1:
            with torch.no_grad():
                kl = forward_kl(student, teacher)
        self._last = (weakref.ref(pred), self._stats(kl, ce))
        return loss

    @staticmethod
    def _stats(kl: torch.Tensor, ce: torch.Tensor) -> dict[str, float]:
        return {"kl": float(kl.detach().sum()), "ce": float(ce.detach().sum()), "tokens": kl.numel()}

    def stats(self, pred: DistillOutput, labels: torch.Tensor) -> dict[str, float]:
        if self._last is not None and self._last[0]() is pred:
            return self._last[1]
        with torch.no_grad():
            student, teacher, targets = self.response_rows(pred, labels)
            return self._stats(forward_kl(student, teacher),
                               F.cross_entropy(student.float(), targets, reduction="none"))


class DistillMetric(Metric):
    """Token-weighted validation mean of ``KDLoss.stats``' ``kl`` or ``ce``; ``perplexity`` is
    exp of the mean ``ce``."""

    def __init__(self, key: str):
        if key not in ("kl", "ce", "perplexity"):
            raise ValueError(f"unknown distillation metric {key!r}")
        self.key = key

    def reset(self) -> None:
        self.total, self.count = 0.0, 0

    def accumulate(self, learn) -> None:
        stats = learn.loss_func.stats(learn.pred, *learn.yb)
        self.total += stats["ce" if self.key == "perplexity" else self.key]
        self.count += stats["tokens"]

    @property
    def value(self):
        if not self.count:
            return None
        mean = self.total / self.count
        return math.exp(mean) if self.key == "perplexity" else mean

    @property
    def name(self) -> str:
        return self.key


DISTILL_METRICS = ("kl", "ce", "perplexity")


# -- the recipe -----------------------------------------------------------------------------
def _unwrapped(model: nn.Module) -> nn.Module:
    """The base model under a PEFT wrapper (or the model itself)."""
    base = getattr(model, "base_model", None)
    return getattr(base, "model", model) if base is not None and hasattr(model, "peft_config") else model


def vocab_size_of(model: nn.Module) -> int:
    model = _unwrapped(model)
    config = getattr(model, "config", None)
    if getattr(config, "vocab_size", None):
        return int(config.vocab_size)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise TypeError(f"cannot tell the vocabulary size of {type(model).__name__}")
    return int(head.weight.shape[0])


def check_same_vocabulary(student: nn.Module, teacher: nn.Module, tokenizer,
                          teacher_tokenizer=None) -> None:
    """Distillation compares the two models' distributions token by token, so both must have the
    same vocabulary: the same output size and, when the teacher has its own tokenizer, the
    same token -> id mapping as the tokenizer the data was made with."""
    s, t = vocab_size_of(student), vocab_size_of(teacher)
    if s != t:
        raise ValueError(f"the student's vocabulary has {s} tokens and the teacher's {t}: "
                         "distillation needs one shared vocabulary. Pick a student of the "
                         f"teacher's family, or, for a preset student, model.overrides.vocab_size={t}")
    if teacher_tokenizer is not None and tokenizer is not None:
        ours, theirs = tokenizer.hf.get_vocab(), teacher_tokenizer.hf.get_vocab()
        if ours != theirs:
            differ = sorted(set(ours.items()) ^ set(theirs.items()), key=str)[:3]
            raise ValueError(f"the teacher's tokenizer maps tokens to ids differently from the one "
                             f"the data is tokenized with (e.g. {differ}): distillation needs one "
                             "shared vocabulary; set tokenizer= to the teacher's, with a student "
                             "of the same family")


def resolve_tokenizer(cfg: DictConfig):
    """``cfg.tokenizer``, else the student's source, else the teacher's."""
    from mlx_train.lm_data import as_tokenizer

    source = cfg.tokenizer or cfg.model.get("source") or cfg.teacher.get("source")
    if not source:
        raise ValueError("neither the student nor the teacher names a source with a tokenizer: "
                         "set tokenizer=NAME_OR_DIR")
    return as_tokenizer(source), str(source)


def teacher_tokenizer_of(cfg: DictConfig, tokenizer_source: str):
    """The teacher's own tokenizer when it has a source other than the one already loaded."""
    from mlx_train.lm_data import as_tokenizer

    source = cfg.teacher.get("source")
    if not source or str(source) == tokenizer_source:
        return None
    try:
        return as_tokenizer(source)
    except (OSError, ValueError) as e:  # e.g. a bare .gguf: the size check still applies
        say(f"distill: not comparing tokenizers, the teacher's did not load ({e})")
        return None


def distill(cfg: DictConfig) -> dict:
    """Run the distill recipe; returns (and writes to ``metrics.json``) its final metrics."""
    from mlx_train import Learner
    from mlx_train.recipes.dpo import build
    from mlx_train.recipes.finetune import prepare_model

    loss = build(cfg.loss)  # bad loss settings fail before anything loads
    started = time.time()
    run = RunDir(cfg)
    seed_everything(cfg.seed)
    tokenizer, tokenizer_source = resolve_tokenizer(cfg)
    data = build(cfg.data, tokenizer=tokenizer)
    teacher = build(cfg.teacher, tokenizer=tokenizer)
    student = prepare_model(cfg, tokenizer)
    check_same_vocabulary(student, teacher, tokenizer, teacher_tokenizer_of(cfg, tokenizer_source))
    peft = has_node(cfg, "adapter")
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    say(f"distill: teacher {sum(p.numel() for p in teacher.parameters()):,} parameters (frozen), "
        f"student {trainable:,} trainable")
    opt_func, lr = optimizer_and_lr(cfg)
    learn = Learner(data.dls, DistillModel(student, teacher), loss, opt_func=opt_func, lr=lr,
                    path=run.path, model_dir=CHECKPOINT_DIR,
                    metrics=[DistillMetric(k) for k in DISTILL_METRICS],
                    cbs=training_callbacks(cfg, data.dls), progress=cfg.train.progress)
    announce_logs(learn)
    before = metrics_before(cfg, learn, DISTILL_METRICS)
    if before:
        say(f"before training: kl={before['kl_before']:.4f}, ce={before['ce_before']:.4f}")
    train_s = fit(cfg, learn, lr, run)
    acc, _ = evaluate_exact_match(cfg, student, data)
    if acc is not None:
        say(f"student exact match after training: {acc:.1%}")
    saved = save_trained(student, run, tokenizer, peft)
    metrics = final_metrics(learn, started, exact_match=acc, train_s=train_s)
    metrics.update(last_values(learn, DISTILL_METRICS))
    metrics.update(before)
    metrics["saved"] = str(saved)
    return write_metrics(run, metrics)


__all__ = ["DISTILL_METRICS", "DistillMetric", "DistillModel", "DistillOutput", "KDLoss",
           "check_same_vocabulary", "distill", "forward_kl", "vocab_size_of"]
