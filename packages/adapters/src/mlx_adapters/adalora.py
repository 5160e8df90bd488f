"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form, ``W x + (alpha / ranknum) B diag(E) A x``, whose
rank budget is re-allocated during training: singular values ``E`` of unimportant triplets are
masked to zero, importance being the smoothed sensitivity ``|p * grad|`` times its uncertainty,
under a cubic budget schedule from ``init_r`` per layer down to ``target_r`` on average.

PEFT's names: ``<module>.lora_A.<adapter>`` ``[r, in]``, ``lora_B`` ``[out, r]``, ``lora_E``
``[r, 1]`` (parameters, no ``.weight``) and ``ranknum`` (the initial rank, neither trained nor
saved). A saved adapter keeps only the triplets its ``rank_pattern`` leaves on.

Training: call ``peft_model.update_and_allocate(step)`` after ``loss.backward()`` and before
``zero_grad()`` each step; the loss (given labels) includes the orthogonal regularisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mlx_adapters.layer import AdapterLayer, wrapped_targets
from mlx_core.peft_config import LoraConfig, PeftConfig


@dataclass
class AdaLoraConfig(LoraConfig):
    peft_type: str = "ADALORA"
    target_r: int = 8  # the average rank left at the end
    init_r: int = 12  # every layer's rank at the start (``r`` is not used)
    tinit: int = 0  # warm-up steps at the full budget
    tfinal: int = 0  # final steps at the target budget, the masks fixed
    deltaT: int = 1  # steps between two budget allocations
    beta1: float = 0.85  # EMA of the sensitivity
    beta2: float = 0.85  # EMA of its uncertainty
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None  # per lora_E: which triplets are kept

    def __post_init__(self):
        PeftConfig.__post_init__(self)  # not LoRA's: AdaLoRA has checks of its own below
        problems = self._problems()
        if self.use_dora:
            problems.append("AdaLoRA does not support DoRA (use_dora=True)")
        if self.lora_bias:
            problems.append("AdaLoRA does not support lora_bias=True")
        if self.init_lora_weights not in (True, False):
            problems.append(f"init_lora_weights must be True or False for AdaLoRA, got "
                            f"{self.init_lora_weights!r}")
        if self.init_r < 0 or self.target_r < 0:
            problems.append(f"init_r and target_r must be >= 0, got {self.init_r} and {self.target_r}")
        if self.total_step is None or self.total_step <= 0:
            problems.append(f"total_step (the number of training steps) must be positive, got "
                            f"{self.total_step}")
        elif self.tinit >= self.total_step - self.tfinal:
            problems.append(f"tinit={self.tinit}, tfinal={self.tfinal} and total_step={self.total_step} "
                            "leave no budgeting phase: decrease tinit/tfinal or increase total_step")
        if self.orth_reg_weight < 0:
            problems.append(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            problems.append(f"beta1 and beta2 must be in (0, 1), got {self.beta1} and {self.beta2}")
        if self.deltaT < 1:
            problems.append(f"deltaT must be >= 1, got {self.deltaT}")
        if problems:
            raise ValueError("invalid AdaLoraConfig: " + "; ".join(problems))

    def to_dict(self):
        data = super().to_dict()
        if self.rank_pattern is not None:  # saved without the adapter's name, as PEFT saves it
            data["rank_pattern"] = {_pattern_key(k): v for k, v in self.rank_pattern.items()}
        return data


def _pattern_key(key: str) -> str:
    """``model.layers.0.self_attn.q_proj.lora_E[.<adapter>]`` -> the form without the adapter."""
    head, sep, _ = key.rpartition(".lora_E")
    return head + sep if sep else key


class SVDLinear(AdapterLayer):
    """``base_layer(x) + sum over active adapters of (alpha / ranknum) B (A * E) dropout(x)``."""

    tables = ("lora_A", "lora_B", "lora_E", "lora_dropout")  # ranknum: fixed, not trained or saved

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.ranknum = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    def add(self, name: str, r: int, config: AdaLoraConfig) -> None:
        device, dtype = self._device_dtype()
        # PEFT's draws, in its order and on the CPU, so one seed gives both libraries one adapter
        a, e, b = torch.randn(r, self.in_features), torch.randn(r, 1), torch.randn(self.out_features, r)
        torch.randn(1)  # PEFT's ranknum starts as a random draw too, then is filled with r
        if config.init_lora_weights:
            nn.init.zeros_(e)
            nn.init.normal_(a, mean=0.0, std=0.02)
            nn.init.normal_(b, mean=0.0, std=0.02)
        self.lora_A[name], self.lora_E[name], self.lora_B[name] = (
            nn.Parameter(t.to(device=device, dtype=dtype)) for t in (a, e, b))
        self.ranknum[name] = nn.Parameter(torch.full((1,), float(r), device=device, dtype=dtype),
                                          requires_grad=False)
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.scaling[name] = config.lora_alpha if config.lora_alpha > 0 else float(r)

    def rank(self, name: str) -> int:
        return self.lora_E[name].shape[0]

    def resize(self, name: str, keep: torch.Tensor) -> None:
        """Keep only the triplets where ``keep`` (bool ``[r]``) is True; ranknum is unchanged."""
        with torch.no_grad():
            a, e, b = self.lora_A[name][keep], self.lora_E[name][keep], self.lora_B[name][:, keep]
        for table, value in (("lora_A", a), ("lora_E", e), ("lora_B", b)):
            old = getattr(self, table)[name]
            getattr(self, table)[name] = nn.Parameter(value.contiguous(), requires_grad=old.requires_grad)

    def delta_weight(self, name: str) -> torch.Tensor:
        product = self.lora_B[name] @ (self.lora_A[name] * self.lora_E[name])
        return product * self.scaling[name] / (self.ranknum[name] + 1e-5)

    def _merge_one(self, name: str) -> None:
        weight = self.base_layer.weight
        weight.add_(self.delta_weight(name).to(weight.dtype))

    def _unmerge_one(self, name: str) -> None:
        weight = self.base_layer.weight
        weight.sub_(self.delta_weight(name).to(weight.dtype))

    def delete(self, name: str) -> None:
        super().delete(name)
        if name in self.ranknum:
            del self.ranknum[name]
        self.scaling.pop(name, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x)
        y = self.base_layer(x)
        for name in self.pending():
            a, b, e = self.lora_A[name], self.lora_B[name], self.lora_E[name]
            dropped = self.lora_dropout[name](x).to(a.dtype)
            update = (dropped @ (a * e).T @ b.T) * self.scaling[name] / (self.ranknum[name] + 1e-5)
            y = y + update.to(y.dtype)
        return y


def svd_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, SVDLinear]]:
    """``(name, layer)`` of every AdaLoRA layer holding ``adapter_name``, in module order."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, SVDLinear) and adapter_name in m.lora_A]


class RankAllocator:
    """The budget schedule and importance scores of one trainable AdaLoRA adapter (PEFT's
    ``RankAllocator``); statistics are kept per parameter, keyed by its name in the base model."""

    def __init__(self, model: nn.Module, config: AdaLoraConfig, adapter_name: str):
        self.model, self.config, self.adapter_name = model, config, adapter_name
        layers = svd_layers(model, adapter_name)
        self.init_bgt = sum(layer.rank(adapter_name) for _, layer in layers)
        self.target_bgt = config.target_r * len(layers)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def _parameters(self):
        """``(layer name, layer, {"lora_A": name, ...})`` with each parameter's full name."""
        for name, layer in svd_layers(self.model, self.adapter_name):
            yield name, layer, {t: f"{name}.{t}.{self.adapter_name}" for t in ("lora_A", "lora_B", "lora_E")}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """The rank budget at ``step`` (cubic decrease between tinit and total - tfinal) and
        whether to re-mask now."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        progress = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_bgt - self.target_bgt) * progress ** 3 + self.target_bgt)
        return budget, step % c.deltaT == 0

    @torch.no_grad()
    def update_ipt(self) -> None:
        """Sensitivity ``|p * grad|``, its EMA (beta1) and the EMA of its deviation (beta2)."""
        b1, b2 = self.config.beta1, self.config.beta2
        for _, layer, names in self._parameters():
            for table, key in names.items():
                p = getattr(layer, table)[self.adapter_name]
                if p.grad is None:
                    raise ValueError(f"{key} has no gradient: call update_and_allocate(step) after "
                                     "loss.backward() and before optimizer.zero_grad()")
                if key not in self.ipt:
                    self.exp_avg_ipt[key] = torch.zeros_like(p)
                    self.exp_avg_unc[key] = torch.zeros_like(p)
                self.ipt[key] = (p * p.grad).abs()
                self.exp_avg_ipt[key] = b1 * self.exp_avg_ipt[key] + (1 - b1) * self.ipt[key]
                self.exp_avg_unc[key] = (b2 * self.exp_avg_unc[key]
                                         + (1 - b2) * (self.ipt[key] - self.exp_avg_ipt[key]).abs())

    def _score(self, key: str) -> torch.Tensor:
        if key not in self.exp_avg_ipt:
            raise ValueError("no importance scores yet: update_and_allocate must run on steps with "
                             "gradients before the budget is allocated")
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero the singular values of all but the ``budget`` most important triplets (a
        triplet's score: its E entry's plus the mean of its A row's and B column's)."""
        triplets = {}
        for _, layer, names in self._parameters():
            a = self._score(names["lora_A"]).mean(dim=1, keepdim=True)
            b = self._score(names["lora_B"]).mean(dim=0).view(-1, 1)
            triplets[names["lora_E"]] = (layer, self._score(names["lora_E"]).view(-1)
                                         + torch.cat((a, b), dim=1).sum(dim=1))
        scores = torch.cat([s for _, s in triplets.values()])
        k = self.init_bgt - budget
        if k > scores.numel():
            raise ValueError(f"cannot cut {k} of {scores.numel()} triplets: this adapter was resized "
                             "after its allocator was made")
        threshold = torch.kthvalue(scores, k).values.item() if k > 0 else float("-inf")
        pattern = {}
        for key, (layer, score) in triplets.items():
            cut = score <= threshold
            layer.lora_E[self.adapter_name].masked_fill_(cut.view(-1, 1), 0.0)
            pattern[key] = (~cut).tolist()
        return pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self, pattern: dict[str, list[bool]]) -> None:
        patterns = {_pattern_key(k): v for k, v in pattern.items()}
        for _, layer, names in self._parameters():
            keep = torch.tensor(patterns[_pattern_key(names["lora_E"])], device=layer.lora_E[self.adapter_name].device)
            layer.lora_E[self.adapter_name].masked_fill_(~keep.view(-1, 1), 0.0)

    def regularization(self) -> torch.Tensor | float:
        """Mean over A and B of every layer of ``||A A^T - I||_F`` / ``||B^T B - I||_F``."""
        total, count = 0, 0
        for _, layer in svd_layers(self.model, self.adapter_name):
            a, b = layer.lora_A[self.adapter_name], layer.lora_B[self.adapter_name]
            for cov in (a @ a.T, b.T @ b):
                eye = torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype)
                total = total + torch.norm(cov - eye, p="fro")
                count += 1
        return total / count if count else 0


def update_and_allocate(peft_model, global_step: int) -> None:
    """PEFT's ``update_and_allocate``: scores update and masks follow the budget before
    ``total_step - tfinal``; at that step the final allocation is fixed (and saved with the
    adapter as ``rank_pattern``); after it the fixed masks are re-applied."""
    allocator = peft_model.rank_allocator
    if allocator is None:
        raise ValueError("update_and_allocate needs a trainable AdaLoRA adapter (get_peft_model with "
                         "an AdaLoraConfig, or from_pretrained(..., is_trainable=True))")
    config = allocator.config
    final = config.total_step - config.tfinal
    if global_step < final:
        allocator.update_ipt()
        budget, mask_now = allocator.budget_schedule(global_step)
        if mask_now:
            config.rank_pattern = allocator.mask_to_budget(budget)
    elif global_step == final:
        budget, _ = allocator.budget_schedule(global_step)
        config.rank_pattern = allocator.mask_to_budget(budget)
        allocator.reset_ipt()
    else:
        if config.rank_pattern is None:
            raise ValueError(f"step {global_step} is past total_step - tfinal = {final}, but no "
                             f"allocation was made: call update_and_allocate at every step")
        allocator.mask_using_rank_pattern(config.rank_pattern)


class AdaLoraTuner:
    config_class = AdaLoraConfig
    layer_class = SVDLinear

    @staticmethod
    def inject(model: nn.Module, config: AdaLoraConfig, adapter_name: str, targets: list[str]) -> None:
        for _, layer in wrapped_targets(model, targets, SVDLinear, lambda _, m: SVDLinear(m)):
            layer.add(adapter_name, config.init_r, config)

    @staticmethod
    def check_new(peft_model, config: AdaLoraConfig) -> None:
        """One trainable AdaLoRA adapter per model, as in PEFT."""
        current = peft_model.rank_allocator
        if not config.inference_mode and current is not None:
            raise ValueError(f"AdaLoRA trains one adapter at a time and {current.adapter_name!r} is "
                             "trainable; load the other with is_trainable=False (inference_mode)")

    @staticmethod
    def on_added(peft_model, adapter_name: str, config: AdaLoraConfig) -> None:
        """A trainable adapter gets the model's rank allocator."""
        if not config.inference_mode:
            peft_model.rank_allocator = RankAllocator(peft_model.base_model.model, config, adapter_name)

    @staticmethod
    def saved_state(peft_model, adapter_name: str, state: dict) -> dict:
        """Only the triplets the rank pattern keeps, as PEFT saves them."""
        pattern = peft_model.peft_config[adapter_name].rank_pattern
        for key, keep in (pattern or {}).items():
            module = "base_model.model." + _pattern_key(key).removesuffix(".lora_E")
            keep = torch.tensor(keep, dtype=torch.bool)
            if int(keep.sum()) == state[f"{module}.lora_E"].shape[0]:
                continue
            for table in ("lora_A", "lora_E"):
                state[f"{module}.{table}"] = state[f"{module}.{table}"][keep].contiguous()
            state[f"{module}.lora_B"] = state[f"{module}.lora_B"][:, keep].contiguous()
        return state

    @staticmethod
    def prepare_load(peft_model, adapter_name: str) -> None:
        """Shrink each layer to the ranks its saved ``rank_pattern`` keeps."""
        pattern = peft_model.peft_config[adapter_name].rank_pattern
        if not pattern:
            return
        patterns = {_pattern_key(k): v for k, v in pattern.items()}
        for name, layer in svd_layers(peft_model.base_model.model, adapter_name):
            keep = patterns.get(f"{name}.lora_E")
            if keep is None:
                raise ValueError(f"the adapter's rank_pattern has no entry for {name}")
            if len(keep) != layer.rank(adapter_name):
                raise ValueError(f"rank_pattern for {name} has {len(keep)} entries, but init_r is "
                                 f"{layer.rank(adapter_name)}")
            layer.resize(adapter_name, torch.tensor(keep, dtype=torch.bool))
