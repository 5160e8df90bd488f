"""PEFT's adapter rules, written once (torch-free) for mlx-adapters (torch), mlx-jax and the
serving engine's multi-LoRA reader: which modules an adapter targets, per-module rank and alpha
overrides, the files and tensor keys of an adapter directory, and the config fields PEFT
writes that change nothing. Each rule is PEFT's own (``peft.tuners.tuners_utils``,
``peft.utils.other.get_pattern_key``), so an adapter means the same thing in every library.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # PEFT's prefix on the saved keys
# Fields PEFT writes that carry no meaning for the adapter's weights.
IGNORED_FIELDS = frozenset({"peft_version", "auto_mapping", "megatron_core", "qalora_group_size",
                            "loftq_config", "ensure_weight_tying"})
OUTPUT_HEADS = frozenset({"lm_head", "score", "classifier"})  # never in "all-linear"
_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")
_LORA_KEY = re.compile(rf"^{re.escape(KEY_PREFIX)}(.+)\.(lora_A|lora_B)\.weight$")


def target_field_problems(target_modules, layers_to_transform, layers_pattern=None) -> list[str]:
    """PEFT's own checks of the target fields: an adapter saved with these would not load into
    PEFT (empty: nothing wrong)."""
    problems = []
    if isinstance(target_modules, str) and layers_to_transform is not None:
        problems.append("layers_to_transform cannot be used when target_modules is a str (a "
                        "regex or 'all-linear'), as in PEFT: list the module names instead, or "
                        "match the layers in the regex")
    if isinstance(target_modules, str) and layers_pattern is not None:
        problems.append("layers_pattern cannot be used when target_modules is a str, as in PEFT: "
                        "list the module names instead")
    if layers_pattern and layers_to_transform is None:
        problems.append("layers_pattern needs layers_to_transform (which layers to adapt)")
    return problems


def module_matches(name: str, patterns: str | Iterable[str] | None) -> bool:
    """PEFT's match of a module name: one regex (full match), or names (equal or a suffix after
    a dot)."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def layer_index(name: str) -> int | None:
    """The decoder layer a module sits in (``model.layers.3.mlp.up_proj`` -> 3), or None."""
    m = _LAYER_INDEX.search("." + name)
    return int(m.group(1)) if m else None


def short_names(names: Iterable[str]) -> str:
    """The distinct last parts of module names, e.g. ``k_proj, lm_head, q_proj``."""
    return ", ".join(sorted({n.split(".")[-1] for n in names})) or "(none)"


def choose_targets(linear: Sequence[str], target_modules, exclude_modules=None,
                   layers_to_transform: int | Iterable[int] | None = None) -> list[str]:
    """The names among ``linear`` (a model's linear modules) that an adapter wraps:
    ``target_modules`` (names, one regex, or ``"all-linear"``: every one but the output head),
    less ``exclude_modules``, in ``layers_to_transform``. An error names the candidates when
    nothing is chosen."""
    if target_modules is None:
        raise ValueError("target_modules is required (names, a regex or 'all-linear'); linear "
                         f"modules in this model: {short_names(linear)}")
    if target_modules == "all-linear":
        chosen = [n for n in linear if n.split(".")[-1] not in OUTPUT_HEADS]
    else:
        chosen = [n for n in linear if module_matches(n, target_modules)]
    chosen = [n for n in chosen if not module_matches(n, exclude_modules)]
    if layers_to_transform is not None:
        layers = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform)
        chosen = [n for n in chosen if layer_index(n) in layers]
    if not chosen:
        raise ValueError(f"target_modules={target_modules!r} matches no linear module of this "
                         f"model; its linear modules are: {short_names(linear)}")
    return chosen


def pattern_value(name: str, patterns: dict, default):
    """A per-module override (``rank_pattern``, ``alpha_pattern``): the value of the first
    pattern ``p`` for which ``(.*\\.)?(p)$`` matches ``name``, else ``default``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def lora_key(module: str, part: str) -> str:
    """The saved key of a LoRA weight: ``base_model.model.<module>.lora_A.weight``."""
    return f"{KEY_PREFIX}{module}.{part}.weight"


def parse_lora_key(key: str) -> tuple[str, str] | None:
    """``(module, "lora_A" | "lora_B")`` of a saved LoRA weight's key, or None for any other."""
    m = _LORA_KEY.match(key)
    return (m.group(1), m.group(2)) if m else None
