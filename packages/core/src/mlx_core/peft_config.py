"""PEFT's config fields, torch-free: ``PeftConfig`` (what every method shares) and
``LoraConfig``, saved as PEFT's ``adapter_config.json`` (same field names and values, so either
library reads the other's). mlx-adapters (torch), its other methods' configs and the serving
engine's multi-LoRA reader use these; ``read_config_json`` reads a directory's file."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_core.peft_rules import CONFIG_NAME, IGNORED_FIELDS, pattern_value, target_field_problems


def read_config_json(directory: str | Path) -> dict[str, Any]:
    """The fields of ``directory``'s ``adapter_config.json``, or an error saying it has none."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a PEFT adapter directory")
    return json.loads(path.read_text())


@dataclass
class PeftConfig:
    """Fields every method shares."""

    peft_type: str = ""
    task_type: str | None = "CAUSAL_LM"
    target_modules: list[str] | str | None = None  # names, one regex, or "all-linear"
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self):
        problems = target_field_problems(self.target_modules, self.layers_to_transform,
                                         self.layers_pattern)
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, directory: str | Path) -> None:
        (Path(directory) / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        # PEFT writes many fields for features we do not have; those must be at their
        # defaults, or the adapter would load as something other than what was trained.
        known = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in data.items() if k in known})
        unsupported = {k: v for k, v in data.items()
                       if k not in known and v not in (None, False, {}, [], "none")
                       and k not in IGNORED_FIELDS}
        if unsupported:
            raise ValueError(f"this {cls.__name__} uses PEFT features mlx_adapters does not "
                             f"support yet: {unsupported}")
        return config


@dataclass
class LoraConfig(PeftConfig):
    """LoRA (Hu et al. 2021): ``W x + (alpha / r) B A x``; rsLoRA scales by ``alpha / sqrt(r)``;
    ``use_dora``: DoRA (Liu et al. 2024), a learned magnitude per output row on top.

    ``bias``: which base-model biases train and are saved with the adapter (``"all"``: every
    bias; ``"lora_only"``: those of the wrapped layers). ``lora_bias``: ``lora_B`` gets a bias
    of its own (zero at init, scaled like the rest of the update).
    ``init_lora_weights``: ``True`` (B = 0), ``"gaussian"``, ``False`` (random, for tests),
    ``"pissa"`` / ``"pissa_niter_K"`` (PiSSA: the principal singular components in A and B, the
    residual in the base weight; ``_niter_K`` uses a randomized SVD with K iterations) or
    ``"olora"`` (OLoRA: the QR factors of W)."""

    peft_type: str = "LORA"
    r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    bias: str = "none"  # "none" | "all" | "lora_only"
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, int] = field(default_factory=dict)
    lora_bias: bool = False

    def __post_init__(self):
        super().__post_init__()
        problems = self._problems()
        if self.r <= 0:
            problems.append(f"r must be positive, got {self.r}")
        if not (self.init_lora_weights in (True, False, "gaussian", "olora")
                or pissa_iterations(self.init_lora_weights) is not None):
            problems.append(f"init_lora_weights must be True, False, 'gaussian', 'pissa', "
                            f"'pissa_niter_K' (K >= 1) or 'olora', got {self.init_lora_weights!r}")
        if self.lora_bias and self.init_lora_weights not in (True, False):
            problems.append("lora_bias=True works with init_lora_weights=True or False only (as in "
                            f"PEFT), got {self.init_lora_weights!r}")
        if self.lora_bias and self.use_dora:
            problems.append("lora_bias=True is not supported with DoRA (as in PEFT); pass use_dora=False")
        if problems:
            raise ValueError(f"invalid {type(self).__name__}: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        """What LoRA and AdaLoRA check alike."""
        problems = []
        if self.bias not in ("none", "all", "lora_only"):
            problems.append(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.fan_in_fan_out:
            problems.append("fan_in_fan_out=True (GPT-2 Conv1D layers) is not supported: the zoo's "
                            "GPT-2 uses nn.Linear, target it directly")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        return problems

    def rank_and_alpha(self, module_name: str) -> tuple[int, int]:
        """Per-module overrides from ``rank_pattern`` / ``alpha_pattern`` (PEFT's rule:
        ``mlx_core.peft_rules.pattern_value``)."""
        return (pattern_value(module_name, self.rank_pattern, self.r),
                pattern_value(module_name, self.alpha_pattern, self.lora_alpha))


def pissa_iterations(init) -> int | None:
    """0 for ``"pissa"`` (a full SVD), K for ``"pissa_niter_K"``, None for anything else."""
    if init == "pissa":
        return 0
    if isinstance(init, str) and init.startswith("pissa_niter_"):
        count = init.removeprefix("pissa_niter_")
        if count.isdigit() and int(count) >= 1:
            return int(count)
    return None
