"""What every recipe shares: the ``Recipe`` record, the run directory, the Learner, resuming,
evaluation and the summary each run writes (``metrics.json``).

A recipe is a thin composition: config -> tokenizer -> data -> model (-> adapters) -> Learner ->
checkpoint. The steps here are the parts that do not differ between recipes.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.markup import escape

CHECKPOINT = "last"
# What the built-in recipes pass themselves when they instantiate these config nodes.
INJECTED = {"data": ("tokenizer",), "model": ("tokenizer",), "optimizer": ("params",)}
CHECKPOINT_DIR = "checkpoints"


@dataclass(frozen=True)
class Recipe:
    """A named recipe: ``recipe(cfg) -> metrics`` and where its primary config lives.

    ``run``: the function, or ``"module:function"`` (imported on first use, so registering a
    recipe costs nothing). ``config_name`` defaults to ``recipe/<name>`` in the package
    ``config_module``. ``injected``: per config node, the parameters the recipe passes itself
    when it instantiates the node (e.g. the tokenizer for ``data``), so validation does not ask
    for them.
    """

    name: str
    description: str
    run: Callable[[DictConfig], dict] | str
    config_name: str = ""
    config_module: str = "mlx_train.conf"
    injected: dict = field(default_factory=lambda: dict(INJECTED))

    def __post_init__(self):
        if not self.config_name:
            object.__setattr__(self, "config_name", f"recipe/{self.name}")

    def __call__(self, cfg: DictConfig) -> dict:
        run = self.run
        if isinstance(run, str):
            import importlib

            module, _, name = run.partition(":")
            run = getattr(importlib.import_module(module), name)
        return run(cfg)


console = Console()


def say(text: str) -> None:
    from mlx_train.distributed import is_main_process

    if is_main_process():  # under torchrun, one voice: rank 0's
        console.print(text, highlight=False)


def seed_everything(seed: int) -> None:
    import torch  # here, not at import: the plugin imports this module at every `mlx` start

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def instantiate(node, **kwargs):
    """``hydra.utils.instantiate`` with plain Python containers, passing only the ``kwargs``
    the target accepts (the recipe offers e.g. ``tokenizer=`` to every model builder)."""
    import inspect

    from hydra.utils import get_object
    from hydra.utils import instantiate as hydra_instantiate

    target = get_object(node["_target_"])
    try:
        params = inspect.signature(target).parameters
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        kwargs = {k: v for k, v in kwargs.items() if takes_all or k in params}
    except (TypeError, ValueError):
        pass
    return hydra_instantiate(node, _convert_="all", **kwargs)


def has_node(cfg: DictConfig, key: str) -> bool:
    """A config group that is present and not the empty ``none`` option."""
    node = cfg.get(key)
    return isinstance(node, DictConfig) and "_target_" in node


# -- the run directory ----------------------------------------------------------------------
class RunDir:
    """``cfg.output_dir``: refuses to overwrite a finished or interrupted run unless
    ``resume=true``, and refuses ``resume=true`` when there is nothing to resume."""

    def __init__(self, cfg: DictConfig):
        from mlx_train.runner import scaleout

        scaleout.start()  # under torchrun: the process group, before the ranks decide together
        self.path = Path(cfg.output_dir).expanduser()
        self.checkpoint = self.path / CHECKPOINT_DIR / f"{CHECKPOINT}.safetensors"
        # rank 0 decides for all: every process resumes, or none
        scaleout.agree(lambda: self.check(cfg))
        if scaleout.is_main_process():
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    @staticmethod
    def check(cfg: DictConfig) -> None:
        """Raise if ``cfg.output_dir`` holds a run and ``resume`` is false, or holds no
        checkpoint and ``resume`` is true."""
        path = Path(cfg.output_dir).expanduser()
        checkpoint = path / CHECKPOINT_DIR / f"{CHECKPOINT}.safetensors"
        if cfg.resume and not checkpoint.is_file():
            raise FileNotFoundError(f"resume=true, but there is no checkpoint to resume from at "
                                    f"{checkpoint}; run without resume=true to start")
        if not cfg.resume and (checkpoint.is_file() or (path / "metrics.json").is_file()):
            raise FileExistsError(f"{path} already holds a run; pass resume=true to continue "
                                  "it, or choose another output_dir=")

    def __truediv__(self, name: str) -> Path:
        return self.path / name


# -- training -------------------------------------------------------------------------------
def optimizer_and_lr(cfg: DictConfig):
    """``(opt_func, lr)``: the optimizer node without its ``lr`` (a partial the Learner calls
    with the parameter groups), and that ``lr``, the peak the scheduler drives."""
    node = OmegaConf.to_container(cfg.optimizer, resolve=True)
    lr = node.pop("lr", None)
    if lr is None:
        raise ValueError("optimizer.lr is not set")
    node["_partial_"] = True
    return instantiate(node), float(lr)


# Callbacks a caller adds to every Learner a recipe builds while ``added_callbacks`` is active
# (the Optuna search's pruning callback): factories called with the config.
_ADDED_CALLBACKS: list[Callable[[DictConfig], list]] = []


@contextlib.contextmanager
def added_callbacks(factory: Callable[[DictConfig], list]):
    """Within the block, every recipe's Learner also gets ``factory(cfg)``'s callbacks."""
    _ADDED_CALLBACKS.append(factory)
    try:
        yield
    finally:
        _ADDED_CALLBACKS.remove(factory)


def training_callbacks(cfg: DictConfig, dls) -> list:
    """The callbacks the config asks every recipe's Learner for: the last checkpoint, gradient
    clipping and accumulation, and the loggers (``logger=``; ``default`` is several)."""
    from mlx_train import GradientAccumulation, GradientClip
    from mlx_train.recipes.components import LastCheckpoint
    from mlx_train.runner import scaleout

    cbs = []
    if cfg.save.checkpoint_every:
        cbs.append(LastCheckpoint(CHECKPOINT, cfg.save.checkpoint_every))
    if cfg.train.grad_clip:
        cbs.append(GradientClip(max_norm=cfg.train.grad_clip))
    if cfg.train.grad_accum > 1:
        bs = getattr(dls.train.dl, "batch_size", None) or dls.train.dl.batch_sampler.bs
        cbs.append(GradientAccumulation(n_acc=bs * cfg.train.grad_accum))
    if has_node(cfg, "logger") and scaleout.is_main_process():  # rank 0 logs for all
        logger = instantiate(cfg.logger)
        cbs += logger if isinstance(logger, list) else [logger]
    cbs += [cb for factory in _ADDED_CALLBACKS for cb in factory(cfg)]
    return cbs + scaleout.callbacks(cfg)  # under torchrun: global-batch data parallelism


def announce_logs(learn) -> None:
    """Print where the learner's loggers write (the run directory's files, TensorBoard, ...)."""
    from mlx_train.callback.train_metrics import where_logged

    for line in where_logged(learn):
        say(f"logging {escape(line)}")


def build_learner(cfg: DictConfig, data, model, run: RunDir):
    from mlx_train import CausalLMLoss, Learner, Perplexity

    opt_func, lr = optimizer_and_lr(cfg)
    cbs = training_callbacks(cfg, data.dls)
    learn = Learner(data.dls, model, CausalLMLoss(), opt_func=opt_func, lr=lr, path=run.path,
                    model_dir=CHECKPOINT_DIR, metrics=[Perplexity()], cbs=cbs,
                    progress=cfg.train.progress)
    announce_logs(learn)
    return learn, lr


def fit(cfg: DictConfig, learn, lr: float, run: RunDir) -> float:
    """Train for ``cfg.epochs`` with the configured schedule, first loading the last checkpoint
    when ``resume=true``. Returns the seconds spent training."""
    started, start = time.time(), 0
    if cfg.resume:
        learn.load(CHECKPOINT)
        start = learn.epochs_done
        say(f"resuming {run.path} after epoch {start} of {cfg.epochs}")
        if start > cfg.epochs:
            raise ValueError(f"the checkpoint has {start} epochs done but epochs={cfg.epochs}; "
                             f"pass epochs>={start}")
    if start < cfg.epochs:
        scheduler = instantiate(cfg.scheduler)
        scheduler.fit(learn, cfg.epochs, lr, start_epoch=start)
    return round(time.time() - started, 1)


# -- evaluation and the summary -------------------------------------------------------------
def evaluate_exact_match(cfg: DictConfig, model, data) -> tuple[float | None, list[str]]:
    from mlx_train.recipes.evaluate import exact_match

    examples = data.eval_examples[: cfg.eval.max_examples]
    if not (cfg.eval.exact_match and examples):
        return None, []
    say(f"scoring {len(examples)} held-out examples (greedy answers, up to "
        f"{cfg.eval.max_new_tokens} new tokens, exact match)")
    return exact_match(model, data.tokenizer, examples, cfg.eval.max_new_tokens)


def final_metrics(learn, started: float, **extra) -> dict:
    history = learn.recorder.history()
    last = history[-1] if history else {}
    metrics = {k: last.get(k) for k in ("train_loss", "valid_loss", "perplexity")}
    metrics["epochs"] = learn.epochs_done if history else 0
    metrics.update({k: v for k, v in extra.items() if v is not None})
    metrics["time_s"] = round(time.time() - started, 1)
    return metrics


def write_metrics(run: RunDir, metrics: dict) -> dict:
    from mlx_train.distributed import is_main_process

    if is_main_process():
        (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in metrics.items())
    say(f"[bold]{escape(str(run.path))}[/bold]: {escape(shown)}")
    return metrics


def metrics_before(cfg: DictConfig, learn, names) -> dict:
    """With ``eval.before`` on a fresh run: the validation loss and the metrics ``names`` before
    any training, keyed ``<name>_before``; else nothing."""
    if not cfg.eval.before or cfg.resume:
        return {}
    values = learn.validate()
    return {f"{k}_before": v for k, v in zip(("valid_loss", *names), values, strict=True)}


def last_values(learn, names) -> dict:
    """The metrics ``names`` of the last epoch the recorder logged."""
    history = learn.recorder.history()
    return {k: history[-1].get(k) for k in names} if history else {}


def save_trained(model, run: RunDir, tokenizer, peft: bool) -> Path:
    """Write the result of a tuning recipe: the adapter (PEFT format, ``run_dir/adapter``) or the
    whole model (HF format with the tokenizer, ``run_dir/model``; gathered from the shards under
    FSDP). Under ``--nproc`` rank 0 writes and every process returns the path."""
    from mlx_train.distributed import is_main_process
    from mlx_train.runner.fsdp import save_full_model

    if peft:
        saved = run / "adapter"
        if is_main_process():
            model.save_pretrained(saved)
    else:
        saved = save_full_model(model, run / "model", tokenizer=tokenizer.hf)
    say(f"saved {saved}")
    return saved


def show_samples(examples, answers: dict[str, list[str]], n: int) -> None:
    """Print ``n`` held-out prompts, their references and each model's answer."""
    for i, ex in enumerate(examples[:n]):
        prompt = next(m["content"] for m in reversed(ex.messages) if m["role"] == "user")
        say(f"[bold]sample {i + 1}[/bold] {escape(repr(prompt))} (reference: "
            f"{escape(repr(ex.answer))})")
        for label, outs in answers.items():
            if i < len(outs):
                say(f"  {label:>14}: {escape(repr(outs[i]))}")


__all__ = ["Recipe", "RunDir", "added_callbacks", "announce_logs", "build_learner", "evaluate_exact_match",
           "final_metrics", "fit", "has_node", "instantiate", "last_values", "metrics_before", "optimizer_and_lr",
           "save_trained", "say",
           "seed_everything",
           "show_samples", "training_callbacks", "write_metrics"]
