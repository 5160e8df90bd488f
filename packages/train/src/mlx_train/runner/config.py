"""Composing a recipe's Hydra config and checking it before any work starts.

``compose_config`` runs Hydra's compose API over the package's configs (``pkg://mlx_train.conf``)
or a user's ``--config-dir`` searched first. Every problem is raised as ``RecipeConfigError``
(a ``ValueError``) carrying Hydra's own message plus what the user can choose instead:

- a wrong group option (``optimizer=adamx``): Hydra lists the available options;
- a wrong key (``optimizer.lrr=1``): the valid keys under that node, and close matches;
- a value of the wrong type or a key a component does not take: every ``_target_`` node is
  checked against its callable's signature (as torchtune validates ``_component_`` configs);
- required values left as ``???``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
import typing
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from mlx_core.registry import close_matches

PACKAGE_CONF = "mlx_train.conf"
RESERVED = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}


class RecipeConfigError(ValueError):
    """A recipe config that cannot be composed or would not run; the message says why."""


# -- the recipe-level settings, type-checked with OmegaConf's structured configs ---------------
@dataclasses.dataclass
class TrainSettings:
    grad_clip: float = 1.0
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    checkpoint_layers: int | None = None  # with gradient_checkpointing: only the first N layers
    progress: bool = True
    strategy: str = "ddp"


@dataclasses.dataclass
class LmEvalSettings:
    """``eval=lm_eval`` (conf/eval/lm_eval.yaml): harness tasks run on the trained result."""

    tasks: list[str] = dataclasses.field(default_factory=lambda: ["mlx_code_book"])
    limit: float | None = None
    chat_template: bool = True
    backend: str = "torch"
    include_path: list[str] = dataclasses.field(default_factory=list)
    before: bool = False


@dataclasses.dataclass
class EvalSettings:
    before: bool = False
    exact_match: bool = True
    max_examples: int = 48
    max_new_tokens: int = 32
    samples: int = 1
    lm_eval: LmEvalSettings | None = None


@dataclasses.dataclass
class SaveSettings:
    checkpoint_every: int = 1


@dataclasses.dataclass
class Settings:
    recipe: str = ""
    output_dir: str = "runs"
    seed: int = 0
    epochs: int = 1
    resume: bool = False
    tokenizer: str | None = None
    quantize: str | None = None
    train: TrainSettings = dataclasses.field(default_factory=TrainSettings)
    eval: EvalSettings = dataclasses.field(default_factory=EvalSettings)
    save: SaveSettings = dataclasses.field(default_factory=SaveSettings)


QUANTIZE = (None, "nf4")
STRATEGIES = ("ddp", "fsdp")  # data parallelism under torchrun: replicated or FSDP2-sharded


def quote(value) -> str:
    """``value`` for an override in Hydra's grammar: as it is when plain, else single-quoted."""
    value = str(value)
    if re.fullmatch(r"[\w./:@+-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# -- composition ------------------------------------------------------------------------------
@contextlib.contextmanager
def _hydra(config_module: str, config_dir: str | Path | None):
    from hydra import initialize_config_dir, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # e.g. inside a Hydra app: compose beside it
        GlobalHydra.instance().clear()
    if config_dir is None:
        with initialize_config_module(config_module=config_module, version_base="1.3"):
            yield
        return
    directory = Path(config_dir).expanduser().resolve()
    if not directory.is_dir():
        raise RecipeConfigError(f"--config-dir {config_dir}: no such directory")
    with initialize_config_dir(config_dir=str(directory), version_base="1.3"):
        yield


def _search_path(config_module: str, config_dir) -> list[str]:
    paths = [] if config_dir is None else [f"pkg://{config_module}"]
    if config_module != PACKAGE_CONF:
        paths.append(f"pkg://{PACKAGE_CONF}")
    return paths


def _compose(recipe, overrides: list[str], config_dir) -> DictConfig:
    from hydra import compose

    extra = _search_path(recipe.config_module, config_dir)
    if extra:
        overrides = [*overrides, f"hydra.searchpath=[{','.join(extra)}]"]
    with _hydra(recipe.config_module, config_dir):
        return compose(config_name=recipe.config_name, overrides=overrides)


def compose_config(recipe, overrides=(), config_dir=None, check: bool = True) -> DictConfig:
    """The recipe's composed config with ``overrides`` (Hydra's override grammar) applied,
    validated (see the module docstring) unless ``check=False``."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = [str(o) for o in overrides or []]
    try:
        cfg = _compose(recipe, overrides, config_dir)
    except RecipeConfigError:
        raise
    except (HydraException, OmegaConfBaseException) as e:
        raise RecipeConfigError(_explain(recipe, overrides, config_dir, e)) from None
    if check:
        validate(cfg, recipe)
    return cfg


def _hydra_message(e: Exception) -> str:
    text = str(e)
    text = text.split("\nConfig search path:")[0]  # the search path is noise here
    return text.replace("add --multirun to your command line",
                        "pass -m (--multirun) to mlx train")


def _explain(recipe, overrides: list[str], config_dir, e: Exception) -> str:
    message = _hydra_message(e)
    found = re.search(r"Could not override '([^']+)'", message) or \
        re.search(r"Key '([^']+)' is not in struct", message)
    if not found:
        return message
    key = found.group(1)
    others = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != key]
    try:
        base = _compose(recipe, others, config_dir)
    except Exception:  # noqa: BLE001 - the hint is optional; Hydra's message stands alone
        return message
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(base, parent) if parent else base
    if not isinstance(node, DictConfig):
        return message
    keys = [k for k in node.keys() if isinstance(k, str) and k not in RESERVED]
    where = f"under '{parent}'" if parent else "at the top level"
    hint = f"\nValid keys {where}: {', '.join(keys)}."
    matches = close_matches(leaf, keys)
    if matches:
        hint += f" Did you mean: {', '.join(f'{parent}.{m}' if parent else m for m in matches)}?"
    return message + hint


# -- validation -------------------------------------------------------------------------------
def validate(cfg: DictConfig, recipe) -> None:
    """Everything that can be checked without building anything (see the module docstring)."""
    from omegaconf.errors import OmegaConfBaseException

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise RecipeConfigError(
            "missing required value(s): " + ", ".join(missing) + ". Set them on the command "
            "line, e.g. " + " ".join(f"{k}=..." for k in missing))
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise RecipeConfigError(f"cannot resolve the config: {e}") from None
    settings = {f.name: resolved[f.name] for f in dataclasses.fields(Settings) if f.name in resolved}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Settings), settings)
    except OmegaConfBaseException as e:
        raise RecipeConfigError(_omegaconf_message(e)) from None
    _check_ranges(merged)
    adapter = resolved.get("adapter")
    if merged.train.strategy == "fsdp" and (merged.quantize or isinstance(adapter, dict)
                                            and "_target_" in adapter):
        raise RecipeConfigError("train.strategy=fsdp shards full fine-tunes (adapter=none, no "
                                "quantize); adapters are small: use train.strategy=ddp")
    for path, node in _target_nodes(resolved):
        check_target(path, node, recipe.injected.get(path, ()))


def _omegaconf_message(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines()]
    key = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), "")
    return f"{key}: {lines[0]}" if key else lines[0]


def _check_ranges(s) -> None:
    problems = []
    if s.epochs < 1:
        problems.append(f"epochs must be at least 1 (got {s.epochs})")
    if s.quantize not in QUANTIZE:
        problems.append(f"quantize must be null or nf4 (got {s.quantize!r})")
    if s.train.grad_accum < 1:
        problems.append(f"train.grad_accum must be at least 1 (got {s.train.grad_accum})")
    if s.train.strategy not in STRATEGIES:
        problems.append(f"train.strategy must be one of {', '.join(STRATEGIES)} (got "
                        f"{s.train.strategy!r})")
    if s.train.grad_clip < 0:
        problems.append(f"train.grad_clip must be >= 0 (got {s.train.grad_clip}); 0 disables it")
    for key in ("max_examples", "max_new_tokens", "samples"):
        if getattr(s.eval, key) < 0:
            problems.append(f"eval.{key} must be >= 0 (got {getattr(s.eval, key)})")
    if s.save.checkpoint_every < 0:
        problems.append(f"save.checkpoint_every must be >= 0 (got {s.save.checkpoint_every})")
    if problems:
        raise RecipeConfigError("; ".join(problems))


def _target_nodes(node, path: str = ""):
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for k, v in node.items():
            if k not in RESERVED:
                yield from _target_nodes(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _target_nodes(v, f"{path}[{i}]")


_SIMPLE = (int, float, bool, str, type(None))


def _allowed_types(obj, name: str, param: inspect.Parameter):
    """The simple types a parameter accepts, or None when we cannot tell (then: no check)."""
    annotation = param.annotation
    with contextlib.suppress(Exception):
        hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
        annotation = hints.get(name, annotation)
    if annotation is inspect.Parameter.empty:
        if param.default is inspect.Parameter.empty or param.default is None:
            return None
        return {type(param.default)} if isinstance(param.default, _SIMPLE) else None
    return _flatten(annotation)


def _flatten(annotation):
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return {("literal", a) for a in typing.get_args(annotation)}
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        out = set()
        for a in typing.get_args(annotation):
            sub = _flatten(a)
            if sub is None:
                return None
            out |= sub
        return out
    if annotation in _SIMPLE:
        return {annotation}
    if getattr(annotation, "__module__", "").startswith("torch") and inspect.isclass(annotation):
        return set()  # e.g. Tensor in Union[float, Tensor]: no config value is one
    return None


def _accepts(allowed: set, value) -> bool:
    literals = {a[1] for a in allowed if isinstance(a, tuple)}
    if value in literals and type(value) in {type(v) for v in literals}:
        return True
    types = {a for a in allowed if not isinstance(a, tuple)}
    if value is None:
        return type(None) in types or not types
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int):
        return int in types or float in types
    if isinstance(value, float):
        return float in types
    if isinstance(value, str):
        return str in types
    return True


def check_target(path: str, node: dict, injected=()) -> None:
    """``node``'s keys are parameters of its ``_target_`` with values of acceptable types, and
    every required parameter is given (or ``injected`` by the recipe)."""
    from hydra.utils import get_object

    target = node["_target_"]
    where = path or "config"
    try:
        obj = get_object(target)
    except Exception as e:  # noqa: BLE001 - any import failure is the same problem to the user
        raise RecipeConfigError(f"{where}._target_: cannot import {target!r} ({e})") from None
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return
    given = {k: v for k, v in node.items() if k not in RESERVED}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        names = [n for n, p in params.items()
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in injected]
        for key in given:
            if key not in params:
                matches = close_matches(key, names)
                hint = f" Did you mean: {', '.join(matches)}?" if matches else ""
                raise RecipeConfigError(f"{where}.{key}: {target} takes no parameter {key!r}.{hint} "
                                        f"Valid keys under '{where}': {', '.join(names)}.")
    partial = node.get("_partial_", False)
    required = [n for n, p in params.items()
                if p.default is inspect.Parameter.empty and n not in given and n not in injected
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if required and not partial:
        raise RecipeConfigError(f"{where}: {target} needs {', '.join(required)}; set "
                                + " ".join(f"{where}.{r}=..." for r in required))
    for key, value in given.items():
        if key not in params or isinstance(value, (dict, list, DictConfig, ListConfig)):
            continue
        allowed = _allowed_types(obj, key, params[key])
        if allowed is not None and allowed and not _accepts(allowed, value):
            literals = sorted(repr(a[1]) for a in allowed if isinstance(a, tuple))  # a set: sort
            types = sorted(t.__name__ for t in allowed if not isinstance(t, tuple))
            expected = " or ".join(types + ([f"one of {', '.join(literals)}"] if literals else []))
            raise RecipeConfigError(f"{where}.{key}={value!r}: {target} expects {expected}")


__all__ = ["PACKAGE_CONF", "RecipeConfigError", "Settings", "check_target", "compose_config",
           "quote", "validate"]
