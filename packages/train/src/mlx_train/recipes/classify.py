"""``classify``: the tabular / vision / text learners from a config.

config -> data (``data=table|image_folder|text_classification``, see
``mlx_train.recipes.classify_data``) -> the learner its kind takes (``learner.tabular``:
``tabular_learner``, ``learner.vision``: ``vision_learner``, ``learner.text``:
``text_classifier_learner``) -> fit with the configured scheduler -> accuracy and macro F1 on
the validation split -> ``run_dir/export.safetensors`` (``learn.export``; ``load_learner`` rebuilds
the model from it alone; for a table, ``table_procs.json`` holds the preprocessing,
``classify_data.load_table_procs``) and ``metrics.json``; ``checkpoints/last.safetensors`` for
``resume=true``, as every recipe.
"""

from __future__ import annotations

import time

from omegaconf import DictConfig

from mlx_train.distributed import is_main_process
from mlx_train.recipes import CLASSIFY_INJECTED
from mlx_train.recipes.base import (
    CHECKPOINT_DIR,
    RunDir,
    announce_logs,
    fit,
    instantiate,
    optimizer_and_lr,
    say,
    seed_everything,
    training_callbacks,
    write_metrics,
)
from mlx_train.recipes.classify_data import ClassifyData, save_table_procs

EXPORT = "export.safetensors"
TABLE_PROCS = "table_procs.json"
# What the recipe passes the learner nodes itself (so config validation does not ask for it).
INJECTED = CLASSIFY_INJECTED


# -- the learners (config nodes learner.tabular / .vision / .text) ---------------------------
def tabular(dls, learner_kwargs: dict, layers: list[int] | None = None, ps: float = 0.0,
            embed_p: float = 0.0, use_bn: bool = True, bn_cont: bool = True):
    """``tabular_learner`` and what ``export`` needs to rebuild its model
    (``TabularModel`` with these arguments)."""
    from mlx_train.tabular_model import get_emb_sz, tabular_learner

    layers = [200, 100] if layers is None else list(layers)
    learn = tabular_learner(dls, layers, ps=ps, embed_p=embed_p, use_bn=use_bn, bn_cont=bn_cont,
                            **learner_kwargs)
    kwargs = {"emb_szs": [list(e) for e in get_emb_sz(dls)], "n_cont": len(dls.cont_names),
              "out_sz": len(dls.vocab), "layers": layers, "ps": ps, "embed_p": embed_p,
              "use_bn": use_bn, "bn_cont": bn_cont}
    return learn, ("mlx_train.tabular_model:TabularModel", kwargs)


def vision(dls, learner_kwargs: dict, arch: str = "simple_cnn", pretrained: bool = False,
           lin_ftrs: list[int] | None = None, ps: float = 0.5, concat_pool: bool = True):
    """``vision_learner`` (``arch``: ``simple_cnn``, a torchvision name, or ``timm/<name>``) and
    its export recipe (``learn.model_recipe``)."""
    from mlx_train.vision import vision_learner

    learn = vision_learner(dls, arch, pretrained=pretrained, lin_ftrs=lin_ftrs, ps=ps,
                           concat_pool=concat_pool, **learner_kwargs)
    return learn, learn.model_recipe


def text(dls, tokenizer, learner_kwargs: dict, model: str = "tiny-llama",
         model_overrides: dict | None = None, n_block_groups: int = 2, drop: float = 0.1,
         freeze: bool | None = None, dtype: str = "float32"):
    """``text_classifier_learner`` on a zoo language model: ``model`` a preset (randomly
    initialised, its vocabulary sized to the tokenizer; ``model_overrides`` changes
    ``ModelConfig`` fields) or a model name / HF directory / ``.gguf`` (pretrained). ``freeze``
    (null: when pretrained) trains only the head."""
    from mlx_core import registry
    from mlx_core.plugins import load_plugins
    from mlx_train.recipes.components import _dtype, preset_model
    from mlx_train.text import load_lm, text_classifier_learner

    load_plugins()
    if model in registry.presets:
        lm, trained = preset_model(model, model_overrides, dtype, tokenizer=tokenizer), False
    else:
        if model_overrides:
            raise ValueError(f"learner.text.model_overrides changes a preset's config; "
                             f"{model!r} is a pretrained model: set it to {{}}")
        lm, trained = load_lm(model, _dtype(dtype))
    if lm.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"learner.text.model={model!r} has a vocabulary of "
                         f"{lm.config.vocab_size}, smaller than the tokenizer's "
                         f"({tokenizer.vocab_size}); use the model's own tokenizer (tokenizer=null)")
    learn = text_classifier_learner(dls, lm, n_block_groups=n_block_groups, drop=drop,
                                    freeze=trained if freeze is None else freeze,
                                    **learner_kwargs)
    kwargs = {"lm_config": lm.config.to_dict(), "n_out": len(dls.vocab), "drop": drop}
    return learn, ("mlx_train.recipes.classify:text_model", kwargs)


# -- factories export names, so load_learner rebuilds the model from the file alone ----------
def vision_model(arch: str = "simple_cnn", n_in: int = 3, n_out: int = 2,
                 lin_ftrs: list[int] | None = None, ps: float = 0.5, concat_pool: bool = True):
    """The ``nn.Sequential(body, head)`` ``vision_learner`` builds (no pretrained weights: the
    export's weights are loaded into it). Exports now name ``mlx_train.vision:create_vision_model``;
    this name stays for the files written before."""
    from mlx_train.vision import create_vision_model

    return create_vision_model(arch, n_out, n_in, lin_ftrs=lin_ftrs, ps=ps,
                               concat_pool=concat_pool)


def text_model(lm_config: dict, n_out: int, drop: float = 0.1):
    """The ``TextClassifier`` of a zoo model with config ``lm_config`` (no weights initialised)."""
    from mlx_core.config import ModelConfig
    from mlx_core.models.loading import build_model
    from mlx_core.transforms import selective_recompute
    from mlx_train.text import TextClassifier

    body = selective_recompute(build_model(ModelConfig.from_dict(lm_config), init=False))
    return TextClassifier(body, n_out, drop)


# -- the recipe -------------------------------------------------------------------------------
_NOT_CLASSIFY_DATA = ("data: {} does not make classification data (a ClassifyData); classify "
                      "takes data=table, data=image_folder or data=text_classification")


def check_data_target(cfg: DictConfig) -> None:
    """Refuse, before reading anything, a data builder declared to return something else (the
    language-model data options share the ``data`` group)."""
    import typing

    from hydra.utils import get_object

    try:
        returns = typing.get_type_hints(get_object(cfg.data._target_)).get("return")
    except Exception:  # noqa: BLE001 - unresolvable hints: the check after building remains
        returns = None
    if returns is not None and returns is not ClassifyData:
        raise ValueError(_NOT_CLASSIFY_DATA.format(cfg.data._target_))


def data_tokenizer(cfg: DictConfig):
    """The tokenizer the text data needs: ``tokenizer=``, else a pretrained ``learner.text.model``'s
    own, else None (the data trains a BPE on the texts, for a random preset)."""
    import inspect

    from hydra.utils import get_object

    from mlx_core import registry
    from mlx_core.plugins import load_plugins
    from mlx_train.lm_data import as_tokenizer

    if "tokenizer" not in inspect.signature(get_object(cfg.data._target_)).parameters:
        return None  # a table or images
    if cfg.tokenizer:
        return as_tokenizer(cfg.tokenizer)
    load_plugins()
    model = cfg.learner.text.model
    return None if model in registry.presets else as_tokenizer(model)


def build_node(node, **kwargs):
    """``instantiate``, raising the builder's own error (``data.target='x' is not a column ...``)
    rather than Hydra's wrapper around it."""
    from hydra.errors import InstantiationException

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, Exception):
            raise e.__cause__ from None
        raise


def build(cfg: DictConfig, data, run: RunDir):
    """The learner for ``data.kind`` with the recipe's callbacks, metrics and optimizer; returns
    ``(learn, lr, (model_factory, model_kwargs))``."""
    from mlx_train.metrics import F1Score, accuracy

    node = cfg.learner.get(data.kind)
    if node is None:
        raise ValueError(f"the config has no learner.{data.kind} for {data.kind} data "
                         f"(data={cfg.data._target_.rsplit('.', 1)[-1]})")
    opt_func, lr = optimizer_and_lr(cfg)
    learner_kwargs = {"opt_func": opt_func, "lr": lr, "path": run.path,
                      "model_dir": CHECKPOINT_DIR, "metrics": [accuracy, F1Score("macro")],
                      "cbs": training_callbacks(cfg, data.dls), "progress": cfg.train.progress}
    learn, spec = build_node(node, dls=data.dls, tokenizer=data.tokenizer,
                             learner_kwargs=learner_kwargs)
    announce_logs(learn)
    return learn, lr, spec


def classify(cfg: DictConfig) -> dict:
    """Run the recipe; returns (and writes to ``metrics.json``) the final metrics."""
    started = time.time()
    run = RunDir(cfg)
    seed_everything(cfg.seed)
    check_data_target(cfg)
    data = build_node(cfg.data, tokenizer=data_tokenizer(cfg))
    if not isinstance(data, ClassifyData):
        raise ValueError(_NOT_CLASSIFY_DATA.format(cfg.data._target_))
    shown = ", ".join(f"{k} {v}" for k, v in data.info.items())
    say(f"classify: {data.kind} data, {shown}; classes {data.classes[:10]}"
        + (" ..." if len(data.classes) > 10 else ""))
    learn, lr, (factory, model_kwargs) = build(cfg, data, run)
    n_params = sum(p.numel() for p in learn.model.parameters())
    say(f"classify: {type(learn.model).__name__}, {n_params:,} parameters")
    train_s = fit(cfg, learn, lr, run)
    valid_loss, acc, f1 = learn.validate()  # the final model, whatever the last epoch logged
    history = learn.recorder.history()
    exported = run / EXPORT
    if is_main_process():  # under --nproc, rank 0 writes
        exported = learn.export(EXPORT, model_factory=factory, model_kwargs=model_kwargs)
        if data.tokenizer is not None:  # texts need it to become token ids again
            data.tokenizer.hf.save_pretrained(run / "tokenizer")
        if data.kind == "tabular":  # new rows need the training statistics (load_table_procs)
            save_table_procs(data.dls, run / TABLE_PROCS)
    say(f"saved {exported}")
    metrics = {"train_loss": history[-1]["train_loss"] if history else None,
               "valid_loss": float(valid_loss), "accuracy": float(acc), "f1_macro": float(f1),
               "epochs": learn.epochs_done, "classes": data.classes,
               "n_train": data.info.get("train"), "n_valid": data.info.get("valid"),
               "train_s": train_s, "time_s": round(time.time() - started, 1),
               "saved": str(exported)}
    return write_metrics(run, metrics)


__all__ = ["EXPORT", "INJECTED", "TABLE_PROCS", "build", "build_node", "check_data_target", "classify", "data_tokenizer", "tabular", "text",
           "text_model", "vision", "vision_model"]
