"""``dpo``: Direct Preference Optimization (Rafailov et al. 2023) over the Learner.

config -> tokenizer -> preference data (``mlx_train.preference_data``) -> model (+ LoRA, as
torchtune's lora_dpo; ``adapter=none`` trains every weight) -> ``PreferenceModel`` (policy
log-probs, and the reference's) -> Learner with ``DPOLoss`` -> ``run_dir/adapter`` (PEFT) or
``run_dir/model`` (HF format).

The reference is the model before training: with an adapter, the same model with the adapter
disabled (no second copy, as PEFT and TRL do); without, a frozen copy. ``reference=data`` reads
it from the data file instead (``ref_chosen_logps`` / ``ref_rejected_logps``), and skips the
reference forward pass.

Loss (``loss_type``), with Δ = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l)),
log-probs summed over the response tokens:
- ``sigmoid``: -(1 - ε) log σ(βΔ) - ε log σ(-βΔ); ε = ``label_smoothing`` (cDPO), 0 = DPO.
- ``ipo``: (Δ' - 1 / (2β))², Δ' from per-token mean log-probs (Azar et al. 2023; the
  length-normalised form TRL uses, confirmed by the IPO authors).
Validation metrics, as TRL names them: ``rewards/chosen`` and ``rewards/rejected`` (β times
each log-ratio), ``rewards/accuracies`` (share of pairs with chosen > rejected reward) and
``rewards/margins`` (their mean difference). As TRL does, the training batches' rewards are
logged too: the step-metrics rows (``train_metrics.csv``, TensorBoard's ``train/rewards/*``)
carry the four, averaged over each interval's pairs, from the loss's own per-pair values.
"""

from __future__ import annotations

import copy
import math
import time
import weakref
from dataclasses import dataclass
from typing import Literal

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
    instantiate,
    last_values,
    metrics_before,
    optimizer_and_lr,
    save_trained,
    say,
    seed_everything,
    training_callbacks,
    write_metrics,
)

REFERENCES = ("model", "data")
ADAPTER_OFF = "adapter-off"  # PreferenceModel's reference: the policy with its adapter disabled


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logps [B], n_tokens [B])``: each row's summed log-probability of its labelled tokens
    (labels shifted by one, as ``CausalLMLoss``; -100 ignored), in fp32, and how many there are."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    keep = labels != IGNORE_INDEX
    picked = logits.gather(-1, labels.masked_fill(~keep, 0).unsqueeze(-1)).squeeze(-1)
    token_logps = picked - logits.logsumexp(-1)  # log_softmax at the label, no [B, T, V] copy
    return (token_logps * keep).sum(-1), keep.sum(-1)


@dataclass(eq=False)
class PolicyOutput:
    """What ``PreferenceModel`` returns (``learn.pred``): per sequence (the B chosen rows, then
    the B rejected rows) the policy's summed log-probs, response token counts, and the
    reference's summed log-probs (None: they come from the data)."""

    logps: torch.Tensor
    n_tokens: torch.Tensor
    ref_logps: torch.Tensor | None = None


class PreferenceModel(nn.Module):
    """``forward(input_ids, attention_mask, labels) -> PolicyOutput`` for the Learner.

    ``reference``: ``ADAPTER_OFF`` (the policy, a PEFT model, with its adapter disabled), a
    frozen model, or None (reference log-probs from the data). A separate reference model is
    kept outside the module tree: it is never trained, never checkpointed (a resumed run builds
    it again from the same source) and stays in eval mode when the Learner calls ``train()``.
    """

    def __init__(self, policy: nn.Module, reference: nn.Module | str | None = None):
        super().__init__()
        if reference == ADAPTER_OFF and not hasattr(policy, "disable_adapter"):
            raise TypeError("reference=adapter-off needs a PEFT model (one with disable_adapter)")
        self.policy = policy
        if isinstance(reference, nn.Module):
            reference.eval().requires_grad_(False)
        self.__dict__["reference"] = reference

    def reference_logps(self, input_ids, attention_mask, labels) -> torch.Tensor | None:
        ref = self.reference
        if ref is None:
            return None
        with torch.no_grad():
            if ref == ADAPTER_OFF:
                with self.policy.disable_adapter():
                    logits = self.policy(input_ids, attention_mask)
            else:
                device = next(ref.parameters()).device
                if device != input_ids.device:
                    ref.to(input_ids.device)
                logits = ref(input_ids, attention_mask)
            return sequence_logps(logits, labels)[0]

    def forward(self, input_ids, attention_mask, labels) -> PolicyOutput:
        logps, n_tokens = sequence_logps(self.policy(input_ids, attention_mask), labels)
        return PolicyOutput(logps, n_tokens, self.reference_logps(input_ids, attention_mask, labels))


class DPOLoss(nn.Module):
    """The DPO loss of a ``PolicyOutput`` against reference log-probs (see the module
    docstring). ``loss(pred, data_ref)``: ``data_ref [B, 2]`` (chosen, rejected) is used when
    ``pred`` carries no reference of its own. ``stats(pred, data_ref)``: per-pair rewards."""

    def __init__(self, beta: float = 0.1, loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
                 label_smoothing: float = 0.0):
        super().__init__()
        if not beta > 0:
            raise ValueError(f"loss.beta must be > 0, got {beta}")
        if loss_type not in ("sigmoid", "ipo"):
            raise ValueError(f"loss.loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"loss.label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if loss_type == "ipo" and label_smoothing:
            raise ValueError("loss.label_smoothing applies to loss_type=sigmoid (cDPO) only")
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self._last = None  # (weakref to the pred, its stats): the metrics reuse them

    def terms(self, pred: PolicyOutput, data_ref: torch.Tensor | None = None):
        """``(chosen_logratios, rejected_logratios, losses)``, one value per pair."""
        if pred.ref_logps is not None:
            ref = pred.ref_logps
        elif data_ref is not None:
            ref = torch.cat([data_ref[:, 0], data_ref[:, 1]]).to(pred.logps)
        else:
            raise ValueError("DPOLoss needs reference log-probs: from the model or the data")
        if torch.isnan(ref).any():
            raise ValueError("reference=data, but this batch has no reference log-probs (the data "
                             "lacks ref_chosen_logps / ref_rejected_logps); add them or use "
                             "reference=model")
        policy_c, policy_r = pred.logps.chunk(2)
        ref_c, ref_r = ref.chunk(2)
        chosen, rejected = policy_c - ref_c, policy_r - ref_r
        if self.loss_type == "ipo":
            n_c, n_r = pred.n_tokens.chunk(2)
            delta = chosen / n_c.clamp(min=1) - rejected / n_r.clamp(min=1)
            losses = (delta - 1 / (2 * self.beta)) ** 2
        else:
            z = self.beta * (chosen - rejected)
            eps = self.label_smoothing
            losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        return chosen, rejected, losses

    def forward(self, pred: PolicyOutput, data_ref: torch.Tensor | None = None) -> torch.Tensor:
        chosen, rejected, losses = self.terms(pred, data_ref)
        self._last = (weakref.ref(pred), self._stats(chosen, rejected))
        return losses.mean()

    def _stats(self, chosen, rejected) -> dict[str, torch.Tensor]:
        c, r = self.beta * chosen.detach(), self.beta * rejected.detach()
        return {"rewards/chosen": c, "rewards/rejected": r,
                "rewards/accuracies": (c > r).float(), "rewards/margins": c - r}

    def stats(self, pred: PolicyOutput, data_ref: torch.Tensor | None = None) -> dict:
        """Per-pair rewards of ``pred`` (from the last loss call when it was on ``pred``)."""
        if self._last is not None and self._last[0]() is pred:
            return self._last[1]
        chosen, rejected, _ = self.terms(pred, data_ref)
        return self._stats(chosen, rejected)


class RewardMetric(Metric):
    """The mean, over pairs, of one of ``DPOLoss.stats``' values: over a validation epoch, or
    over a step-metrics interval's training batches (``TrainMetrics.batch_metrics``). Under
    ``--nproc N`` ``TrainMetrics`` adds up ``total`` and ``count`` over the processes before
    reading ``value``: the mean over the global batch's pairs."""

    sum_over_ranks = ("total", "count")

    def __init__(self, key: str):
        self.key = key

    def reset(self) -> None:
        self.total, self.count = None, 0

    def accumulate(self, learn) -> None:
        values = learn.loss_func.stats(learn.pred, *learn.yb)[self.key]
        total = values.sum()  # stays on the device: read once, by ``value``
        self.total = total if self.total is None else self.total + total
        self.count += values.numel()

    @property
    def value(self):
        return float(self.total) / self.count if self.count else None

    @property
    def name(self) -> str:
        return self.key


REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def reward_metrics() -> list[RewardMetric]:
    return [RewardMetric(k) for k in REWARD_METRICS]


def log_train_rewards(learn) -> None:
    """Add the training batches' rewards to the step-metrics rows, when the logger makes them."""
    step_metrics = learn.cb("train_metrics")
    if step_metrics is not None:
        step_metrics.batch_metrics = reward_metrics()


# -- the recipe -----------------------------------------------------------------------------
def build(node, **kwargs):
    """``instantiate``, raising the component's own error (e.g. a data file's ``ValueError``
    naming the line and the fix) rather than Hydra's wrapper around it."""
    from hydra.errors import InstantiationException

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, (ValueError, TypeError, OSError)):
            raise e.__cause__ from None
        raise


def build_reference(cfg: DictConfig, model: nn.Module):
    """What ``PreferenceModel`` compares against (see the module docstring)."""
    if cfg.reference == "data":
        return None
    if has_node(cfg, "adapter"):
        return ADAPTER_OFF
    say("dpo: adapter=none, so the reference is a frozen copy of the model (twice the memory; "
        "reference=data avoids it)")
    return copy.deepcopy(model)


def dpo(cfg: DictConfig) -> dict:
    """Run the dpo recipe; returns (and writes to ``metrics.json``) its final metrics."""
    from mlx_train import Learner
    from mlx_train.recipes.finetune import prepare_model, resolve_tokenizer

    if cfg.reference not in REFERENCES:
        raise ValueError(f"reference must be 'model' (the model before training) or 'data' "
                         f"(ref_chosen_logps / ref_rejected_logps in the data), got {cfg.reference!r}")
    loss = build(cfg.loss)  # bad loss settings fail before anything loads
    started = time.time()
    run = RunDir(cfg)
    seed_everything(cfg.seed)
    tokenizer = resolve_tokenizer(cfg)
    data = build(cfg.data, tokenizer=tokenizer, require_reference_logps=cfg.reference == "data")
    say(f"dpo: {data.info}")
    model = prepare_model(cfg, tokenizer)
    peft = has_node(cfg, "adapter")
    if peft:
        trainable, total = model.get_nb_trainable_parameters()
        say(f"dpo: {trainable:,} trainable parameters of {total:,} "
            f"({100 * trainable / total:.2f}%)")
    pairs = PreferenceModel(model, build_reference(cfg, model))
    opt_func, lr = optimizer_and_lr(cfg)
    learn = Learner(data.dls, pairs, loss, opt_func=opt_func, lr=lr, path=run.path,
                    model_dir=CHECKPOINT_DIR, metrics=reward_metrics(),
                    cbs=training_callbacks(cfg, data.dls), progress=cfg.train.progress)
    log_train_rewards(learn)
    announce_logs(learn)
    before = metrics_before(cfg, learn, REWARD_METRICS)
    if before:
        say(f"before training: {_shown(before)}")
    train_s = fit(cfg, learn, lr, run)
    acc, _ = evaluate_exact_match(cfg, model, data)
    if acc is not None:
        say(f"exact match (greedy answer == chosen response) after training: {acc:.1%}")
    saved = save_trained(model, run, tokenizer, peft)
    metrics = final_metrics(learn, started, exact_match=acc, train_s=train_s)
    metrics.pop("perplexity", None)  # not a language-modelling loss
    metrics.update(last_values(learn, REWARD_METRICS))
    metrics.update(before)
    metrics["saved"] = str(saved)
    return write_metrics(run, metrics)


def _shown(values: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in values.items()
                     if isinstance(v, float) and math.isfinite(v))


__all__ = ["ADAPTER_OFF", "DPOLoss", "PolicyOutput", "PreferenceModel", "REWARD_METRICS",
           "RewardMetric", "dpo", "log_train_rewards", "reward_metrics", "sequence_logps"]
