"""How a sparse MoE layer picks each token's experts and weighs them: one small strategy, chosen
by the config (``scoring_func``, ``topk_method``, ``n_group``/``topk_group``,
``norm_topk_prob``, ``routed_scaling_factor``).

- Mixtral, Qwen3-MoE: softmax scores, the top k (``greedy``), renormalised or not. This plain
  form runs through ``mlx_kernels.moe_route`` (a Triton kernel on CUDA).
- DeepSeek-V2: softmax scores; ``greedy``, or ``group_limited_greedy``: the experts split into
  ``n_group`` groups, each scored by its best expert, the top k taken within the best
  ``topk_group`` groups; the weights times ``routed_scaling_factor``.
- DeepSeek-V3: sigmoid scores; ``noaux_tc``: the choice (not the weights) adds the router's
  ``e_score_correction_bias``, a group scores as the sum of its two best, the chosen weights are
  renormalised (``norm_topk_prob``) and scaled.

Routing decisions are taken in fp32 from the router logits; the weights stay differentiable in
the logits (gathered from the scores after the choice).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlx_core.config import ModelConfig
from mlx_kernels import moe_route


@dataclass(frozen=True)
class Routing:
    top_k: int
    renormalize: bool
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    scaling: float = 1.0

    @classmethod
    def from_config(cls, config: ModelConfig) -> Routing:
        return cls(config.num_experts_per_tok, config.norm_topk_prob, config.scoring_func,
                   config.topk_method, config.n_group, config.topk_group,
                   config.routed_scaling_factor)

    @property
    def plain(self) -> bool:
        """Mixtral's form: the fused routing kernel computes it."""
        return (self.scoring_func, self.topk_method, self.scaling) == ("softmax", "greedy", 1.0)

    @property
    def uses_correction_bias(self) -> bool:
        return self.topk_method == "noaux_tc"

    def __call__(self, logits: torch.Tensor, correction_bias: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits [N, E]`` -> ``(weights [N, k] fp32, experts [N, k] int64)``."""
        if self.plain:
            return moe_route(logits, self.top_k, self.renormalize)
        logits = logits.float()
        scores = logits.softmax(dim=-1) if self.scoring_func == "softmax" else logits.sigmoid()
        choice = scores if correction_bias is None else scores + correction_bias.float()
        if self.topk_method != "greedy":
            choice = self._within_best_groups(choice.detach())
        experts = torch.topk(choice.detach(), self.top_k, dim=-1).indices
        weights = scores.gather(1, experts)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, experts

    def _within_best_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """``choice`` with the experts outside each token's best ``topk_group`` groups masked
        out (to 0 for group_limited_greedy's positive scores, -inf for noaux_tc's)."""
        n, experts = choice.shape
        grouped = choice.view(n, self.n_group, experts // self.n_group)
        if self.topk_method == "noaux_tc":
            group_scores, fill = grouped.topk(2, dim=-1).values.sum(dim=-1), float("-inf")
        else:
            group_scores, fill = grouped.amax(dim=-1), 0.0
        best = torch.topk(group_scores, self.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return grouped.masked_fill(~keep[..., None], fill).view(n, experts)
