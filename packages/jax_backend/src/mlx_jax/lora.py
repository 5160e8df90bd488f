"""LoRA on the Flax model, in PEFT's format, with no torch: load an adapter directory
(``adapter_config.json`` + ``adapter_model.safetensors``, as PEFT and mlx_adapters write it),
add fresh adapters for training, merge them, and save them back for torch to load.

A targeted ``Linear`` becomes a ``LoraLinear`` that keeps the base ``weight``/``bias`` under
their names and adds ``lora_A.weight [r, in]`` and ``lora_B.weight [out, r]`` (``nnx.LoRAParam``,
so ``trainable=LoraParam`` trains only them): ``y = W x + b + scaling * B A x`` with
``scaling = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``). The state paths are PEFT's
saved keys minus ``base_model.model.``, so loading is a strict name-for-name fill. Target rules
follow PEFT: ``target_modules`` as names (suffix match), one regex (full match) or
``"all-linear"`` (every linear layer but the output head), then ``exclude_modules``,
``layers_to_transform``, ``rank_pattern`` and ``alpha_pattern``.

Not supported (refused when an adapter uses them): DoRA, LoRA biases, ``modules_to_save``,
embedding or ``lm_head`` targets, GPT-2 Conv1D layouts (``fan_in_fan_out``).
``lora_dropout`` is accepted but never applied (inference is unaffected; JAX training runs
without LoRA dropout).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlx_core.peft_rules import (
    CONFIG_NAME,
    IGNORED_FIELDS,
    KEY_PREFIX,
    OUTPUT_HEADS,
    WEIGHTS_NAME,
    choose_targets,
    lora_key,
    pattern_value,
    target_field_problems,
)
from mlx_jax import ops
from mlx_jax.loading import param_name
from mlx_jax.modules import Linear

LoraParam = nnx.LoRAParam

# PEFT's fields with no bearing on a LoRA adapter's weights as mlx_jax applies them
_IGNORED = IGNORED_FIELDS | {"task_type", "inference_mode", "revision", "layers_pattern",
                             "base_model_name_or_path"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The LoRA fields of PEFT's ``adapter_config.json`` (same names, same meaning)."""

    target_modules: tuple[str, ...] | str
    r: int = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: tuple[int, ...] | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    lora_dropout: float = 0.0
    init_lora_weights: bool | str = True  # True: B = 0; "gaussian": A ~ N(0, 1/r); False: B random
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        def set_(name, value):  # normalising the fields of a frozen dataclass
            object.__setattr__(self, name, value)

        if isinstance(self.target_modules, (list, tuple, set)):
            set_("target_modules", tuple(sorted(self.target_modules)))
        if isinstance(self.exclude_modules, (list, tuple, set)):
            set_("exclude_modules", tuple(sorted(self.exclude_modules)))
        if isinstance(self.layers_to_transform, int):
            set_("layers_to_transform", (self.layers_to_transform,))
        elif self.layers_to_transform is not None:
            set_("layers_to_transform", tuple(self.layers_to_transform))
        problems = []
        if not self.target_modules:
            problems.append("target_modules is required (names, one regex or 'all-linear')")
        if self.r <= 0 or any(v <= 0 for v in self.rank_pattern.values()):
            problems.append(f"r must be positive (r={self.r}, rank_pattern={self.rank_pattern})")
        if self.init_lora_weights not in (True, False, "gaussian"):
            problems.append("init_lora_weights must be True, False or 'gaussian', got "
                            f"{self.init_lora_weights!r}")
        problems += target_field_problems(self.target_modules, self.layers_to_transform)
        if problems:
            raise ValueError("invalid LoRA config: " + "; ".join(problems))

    def __hash__(self) -> int:  # a static attribute of the model: jit hashes it
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "the adapter config") -> LoraConfig:
        if str(data.get("peft_type", "LORA")).upper() != "LORA":
            raise ValueError(f"{where} is a {data.get('peft_type')} adapter; mlx_jax loads LoRA "
                             "adapters only")
        unsupported = {k: data[k] for k in ("use_dora", "lora_bias", "fan_in_fan_out",
                                            "modules_to_save") if data.get(k)}
        if data.get("bias", "none") != "none":
            unsupported["bias"] = data["bias"]
        known = {f.name for f in dataclasses.fields(cls)}
        unsupported.update({k: v for k, v in data.items()
                            if k not in known | _IGNORED | {"peft_type", "bias", "use_dora",
                                                            "lora_bias", "fan_in_fan_out",
                                                            "modules_to_save"}
                            and v not in (None, False, {}, [], "none")})
        if unsupported:
            raise ValueError(f"{where} uses LoRA features mlx_jax does not support: {unsupported}")
        if not data.get("target_modules"):
            raise ValueError(f"{where} has no target_modules (names, one regex or 'all-linear')")
        return cls(**{k: v for k, v in data.items() if k in known and v is not None})

    def to_dict(self) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` fields (what PEFT and mlx_adapters read)."""
        out = dataclasses.asdict(self)
        for key in ("target_modules", "exclude_modules", "layers_to_transform"):
            if isinstance(out[key], tuple):
                out[key] = list(out[key])
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none",
                "fan_in_fan_out": False, "use_dora": False, "modules_to_save": None,
                "inference_mode": True, **out}

    def rank_and_alpha(self, name: str) -> tuple[int, float]:
        """PEFT's per-module overrides (``mlx_core.peft_rules.pattern_value``)."""
        return (pattern_value(name, self.rank_pattern, self.r),
                pattern_value(name, self.alpha_pattern, self.lora_alpha))


class _LoraWeight(nnx.Module):
    """Holds one LoRA matrix under ``.weight``, so its path reads ``...lora_A.weight``."""

    def __init__(self, value):
        self.weight = LoraParam(value)


class LoraLinear(nnx.Module):
    """``x @ W.T + b + scaling * (x @ A.T) @ B.T``; W and b are the base layer's own Params."""

    def __init__(self, base: Linear, r: int, alpha: float, *, use_rslora: bool, key,
                 init: bool | str = True):
        out_features, in_features = base.weight[...].shape
        dtype = base.weight[...].dtype
        self.weight, self.bias = base.weight, base.bias
        key_a, key_b = jax.random.split(key)
        if init == "gaussian":
            a = jax.random.normal(key_a, (r, in_features), jnp.float32) / r
        else:  # PEFT's default: A like nn.Linear's kaiming-uniform(a=sqrt(5)), bound 1/sqrt(in)
            bound = 1 / math.sqrt(in_features)
            a = jax.random.uniform(key_a, (r, in_features), jnp.float32, -bound, bound)
        if init is False:  # random B too (PEFT's "for tests")
            bound = 1 / math.sqrt(r)
            b = jax.random.uniform(key_b, (out_features, r), jnp.float32, -bound, bound)
        else:
            b = jnp.zeros((out_features, r), jnp.float32)
        self.lora_A = _LoraWeight(a.astype(dtype))
        self.lora_B = _LoraWeight(b.astype(dtype))
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)

    def __call__(self, x):
        return ops.lora_linear(x, self.weight[...], self.lora_A.weight[...], self.lora_B.weight[...],
                               self.scaling, None if self.bias is None else self.bias[...])

    def merged(self) -> Linear:
        """A plain ``Linear`` with ``W + scaling * B A`` (computed in fp32)."""
        weight = self.weight[...]
        delta = self.scaling * (self.lora_B.weight[...].astype(jnp.float32)
                                @ self.lora_A.weight[...].astype(jnp.float32))
        return Linear.of(nnx.Param((weight.astype(jnp.float32) + delta).astype(weight.dtype)),
                         self.bias)


def linear_modules(model: nnx.Module) -> dict[str, nnx.Module]:
    """Dotted name -> every ``Linear`` / ``LoraLinear`` of the model (not looking inside LoRA)."""
    return {param_name(path): m for path, m in nnx.iter_modules(model)
            if isinstance(m, (Linear, LoraLinear))}


def find_targets(model: nnx.Module, config: LoraConfig) -> list[str]:
    """The names of the linear layers ``config`` targets; errors name the candidates."""
    chosen = choose_targets(list(linear_modules(model)), config.target_modules,
                            config.exclude_modules, config.layers_to_transform)
    heads = [n for n in chosen if n.split(".")[-1] in OUTPUT_HEADS]
    if heads:
        raise ValueError(f"LoRA on the output head ({heads[0]}) is not supported by mlx_jax; "
                         "target the decoder's linear layers")
    return chosen


def _parent_and_attr(model: nnx.Module, name: str):
    *parents, attr = name.split(".")
    node = model
    for part in parents:
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node, attr


def apply_lora(model: nnx.Module, config: LoraConfig | dict, *, seed: int = 0) -> list[str]:
    """Wrap the targeted linear layers with new LoRA weights (PEFT's initialisation: B = 0, so
    the model's output is unchanged); returns the wrapped layers' names. In place."""
    if isinstance(config, dict):
        config = LoraConfig.from_dict(config)
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("this model already has a LoRA adapter; merge_lora(model) first to "
                         "stack another one on the merged weights")
    names = find_targets(model, config)
    keys = jax.random.split(jax.random.key(seed), len(names))
    for name, key in zip(names, keys, strict=True):
        parent, attr = _parent_and_attr(model, name)
        r, alpha = config.rank_and_alpha(name)
        setattr(parent, attr, LoraLinear(getattr(parent, attr), r, alpha,
                                         use_rslora=config.use_rslora, key=key,
                                         init=config.init_lora_weights))
    model.lora_config = config
    return names


def lora_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
    """The LoRA weights under PEFT's saved names (``base_model.model.<path>.lora_A.weight``)."""
    state = nnx.state(model, LoraParam)
    return {KEY_PREFIX + param_name(path): np.asarray(v.get_value())
            for path, v in nnx.to_flat_state(state)}


def read_config(directory: str | Path) -> LoraConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a PEFT adapter directory")
    return LoraConfig.from_dict(json.loads(path.read_text()), where=str(path))


def load_lora(model: nnx.Module, directory: str | Path) -> nnx.Module:
    """Add the PEFT-format LoRA adapter in ``directory`` to ``model`` (in place; returned too).
    Every tensor must fill a LoRA weight of the right shape and every LoRA weight must be
    filled: a missing, unexpected or mis-shaped tensor raises, naming it, before the model is
    touched."""
    from mlx_core.checkpoint_numpy import read_safetensors_numpy

    directory = Path(directory)
    config = read_config(directory)
    if not (directory / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    saved = read_safetensors_numpy(directory)
    layers = linear_modules(model)
    expected = {}
    for name in find_targets(model, config):
        out_features, in_features = layers[name].weight[...].shape
        r, _ = config.rank_and_alpha(name)
        expected[lora_key(name, "lora_A")] = (r, in_features)
        expected[lora_key(name, "lora_B")] = (out_features, r)
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter in {directory} does not fit this model: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]} (different target modules or base model?)")
    for key, shape in expected.items():
        if tuple(saved[key].shape) != shape:
            raise ValueError(f"adapter tensor {key} in {directory} has shape "
                             f"{tuple(saved[key].shape)}, but this model and the adapter's r "
                             f"expect {shape} (a different base model or rank?)")
    apply_lora(model, config)
    filled = [(path, var.replace(jnp.asarray(saved[KEY_PREFIX + param_name(path)], var.get_value().dtype)))
              for path, var in nnx.to_flat_state(nnx.state(model, LoraParam))]
    nnx.update(model, nnx.from_flat_state(filled))
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every LoRA layer into its base weight (``W + scaling * B A``) and remove it; the
    result is the plain model (``save_model`` writes it as an ordinary checkpoint). In place."""
    if getattr(model, "lora_config", None) is None:
        raise ValueError("this model has no LoRA adapter to merge")
    for name, module in linear_modules(model).items():
        if isinstance(module, LoraLinear):
            parent, attr = _parent_and_attr(model, name)
            setattr(parent, attr, module.merged())
    model.lora_config = None
    return model


def save_lora(model: nnx.Module, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Write the model's LoRA adapter as PEFT does (``adapter_config.json`` +
    ``adapter_model.safetensors``): PEFT and mlx_adapters load it onto the torch model."""
    from safetensors.numpy import save_file

    from mlx_core.paths import atomic_directory

    config = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("this model has no LoRA adapter to save (apply_lora or load_lora first)")
    directory = Path(directory)
    with atomic_directory(directory, overwrite=overwrite) as out:
        (out / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2))
        save_file(lora_arrays(model), str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


__all__ = ["LoraConfig", "LoraLinear", "LoraParam", "apply_lora", "find_targets", "linear_modules",
           "load_lora", "lora_arrays", "merge_lora", "read_config", "save_lora"]
