"""``ModelConfig``: the one description of a decoder that every backend builds from.

It round-trips through JSON (our own form) and through HF ``config.json`` for the families the
zoo covers: Llama (2/3), Mistral, Qwen2, Qwen3, OLMo 2, Phi-3, Gemma 2 and 3, SmolLM2 (a
Llama), GPT-2, Mixtral, Qwen3-MoE and DeepSeek-V2/V3.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_core.hf_config import HF_MODEL_TYPES, config_to_hf, fields_from_hf
from mlx_core.rope_scaling import _yarn_mscale, rope_scaling_problems

MLP_KINDS = ("swiglu", "gelu", "geglu")  # gated SiLU (Llama) | GELU-tanh (GPT-2) | gated GELU-tanh (Gemma)
NORM_KINDS = ("rms", "layer")
POSITION_KINDS = ("rope", "learned")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
# q/k normalisation: over each head's vector (Qwen3) or the whole projection (OLMo 2)
QK_NORMS = (None, "head", "projection")
# norms before each block, on its input (Llama), after it, on its output (OLMo 2), or both (Gemma)
NORM_PLACEMENTS = ("pre", "post", "sandwich")
# per-layer attention (Gemma 3): full, or over the last ``sliding_window`` keys only
LAYER_TYPES = ("full_attention", "sliding_attention")
# attention: per-head q/k/v projections (with GQA), or DeepSeek's multi-head latent attention
ATTENTION_KINDS = ("default", "mla")
# MoE routing (mlx_core.models.moe_routing): the experts' scores, and how the top k are chosen
MOE_SCORING_FUNCS = ("softmax", "sigmoid")
MOE_TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer. ``model_type`` is the HF family it maps to on disk."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None  # None: same as num_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_heads
    intermediate_size: int = 11008
    mlp_kind: str = "swiglu"
    norm_kind: str = "rms"
    norm_eps: float = 1e-5
    position_kind: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3"|"linear", "factor": ...}
    max_position_embeddings: int = 4096
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2, GPT-2)
    attention_out_bias: bool = False  # bias on the output projection (GPT-2)
    qk_norm: str | None = None  # RMSNorm of queries and keys before RoPE: QK_NORMS
    norm_placement: str = "pre"  # NORM_PLACEMENTS
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral: each token sees at most this many keys
    # which layers the window applies to (HF's layer_types); None: every layer (Mistral)
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (Gemma 3), unscaled
    norm_weight_offset: float = 0.0  # RMSNorm scales by (offset + weight): Gemma's 1 + weight
    embedding_multiplier: float | None = None  # embeddings times this (Gemma: sqrt(hidden_size))
    query_pre_attn_scalar: float | None = None  # attention scale its ** -0.5; None: head_dim's
    attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcapping: float | None = None  # the same on the output logits (Gemma 2)
    num_experts: int = 0  # > 0: a sparse mixture-of-experts feed-forward (Mixtral, Qwen3-MoE)
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None  # each expert's; None: intermediate_size (Mixtral)
    norm_topk_prob: bool = True  # the chosen experts' weights renormalised to sum to one
    # MoE models: the layers with a dense MLP (of intermediate_size) instead (Qwen3-MoE)
    mlp_only_layers: tuple[int, ...] = ()
    # DeepSeekMoE: shared experts (one dense MLP of n_shared_experts * moe_intermediate_size
    # beside the routed ones), the routed weights times routed_scaling_factor, and the routing
    scoring_func: str = "softmax"  # MOE_SCORING_FUNCS
    topk_method: str = "greedy"  # MOE_TOPK_METHODS; the group methods pick topk_group of n_group
    n_group: int | None = None
    topk_group: int | None = None
    n_shared_experts: int = 0
    routed_scaling_factor: float = 1.0
    # multi-head latent attention (attention_kind "mla", DeepSeek-V2/V3): queries from hidden
    # (q_lora_rank None) or through a normed rank-q_lora_rank bottleneck; keys and values from one
    # normed kv_lora_rank latent, plus a qk_rope_head_dim key part shared by all heads; RoPE on
    # the rope part only (head_dim is qk_rope_head_dim), its pairs interleaved where
    # rope_interleave
    attention_kind: str = "default"
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # HF fields we keep but do not interpret

    def __post_init__(self):
        if self.attention_kind == "mla":  # RoPE's width; every head has its own keys/values
            object.__setattr__(self, "head_dim", self.head_dim or self.qk_rope_head_dim or None)
            object.__setattr__(self, "num_kv_heads", self.num_kv_heads or self.num_heads)
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError("invalid ModelConfig: hidden_size must be divisible by num_heads "
                             f"(or set head_dim) (got {self!r})")
        # Canonical form: head counts and sizes explicit, so equal models compare equal.
        object.__setattr__(self, "num_kv_heads", self.num_kv_heads or self.num_heads)
        object.__setattr__(self, "head_dim", self.head_dim or self.hidden_size // self.num_heads)
        if self.layer_types is not None:  # JSON gives a list; a tuple keeps the config hashable
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "mlp_only_layers", tuple(sorted(set(self.mlp_only_layers))))
        checks = [
            (self.model_type in HF_MODEL_TYPES, f"model_type must be one of {HF_MODEL_TYPES}"),
            (self.mlp_kind in MLP_KINDS, f"mlp_kind must be one of {MLP_KINDS}"),
            (self.norm_kind in NORM_KINDS, f"norm_kind must be one of {NORM_KINDS}"),
            (self.position_kind in POSITION_KINDS, f"position_kind must be one of {POSITION_KINDS}"),
            (self.qk_norm in QK_NORMS, f"qk_norm must be one of {QK_NORMS}"),
            (self.norm_placement in NORM_PLACEMENTS,
             f"norm_placement must be one of {NORM_PLACEMENTS}"),
            (self.num_heads % self.kv_heads == 0, "num_heads must be a multiple of num_kv_heads"),
            (self.num_experts == 0 or 0 < self.num_experts_per_tok <= self.num_experts,
             "num_experts_per_tok must be between 1 and num_experts"),
            (all(0 <= i < self.num_layers for i in self.mlp_only_layers),
             "mlp_only_layers must name layers 0..num_layers-1"),
            (self.layer_types is None or (len(self.layer_types) == self.num_layers
                                          and set(self.layer_types) <= set(LAYER_TYPES)),
             f"layer_types must name one of {LAYER_TYPES} per layer"),
            (self.layer_types is None or self.sliding_window is not None,
             "layer_types needs a sliding_window for its sliding layers"),
            (self.attention_kind in ATTENTION_KINDS,
             f"attention_kind must be one of {ATTENTION_KINDS}"),
            (self.scoring_func in MOE_SCORING_FUNCS,
             f"scoring_func must be one of {MOE_SCORING_FUNCS}"),
            (self.topk_method in MOE_TOPK_METHODS, f"topk_method must be one of {MOE_TOPK_METHODS}"),
            (self.n_shared_experts >= 0, "n_shared_experts must be >= 0"),
            *self._group_checks(),
            *self._mla_checks(),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid ModelConfig: {message} (got {self!r})")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in ROPE_TYPES:
                raise ValueError(
                    f"invalid ModelConfig: rope_scaling type {rope_type!r} is not supported; "
                    f"supported: {ROPE_TYPES}"
                )
            problems = rope_scaling_problems(self.rope_scaling, self.dim_per_head)
            if problems:
                raise ValueError(f"invalid ModelConfig: rope_scaling: {'; '.join(problems)}")

    def _group_checks(self) -> list[tuple[bool, str]]:
        if self.topk_method == "greedy" or self.num_experts == 0:
            return []
        groups, chosen = self.n_group, self.topk_group
        ok = (isinstance(groups, int) and groups > 0 and self.num_experts % groups == 0
              and isinstance(chosen, int) and 0 < chosen <= groups)
        checks = [(ok, f"topk_method {self.topk_method!r} needs n_group dividing num_experts "
                       "and 1 <= topk_group <= n_group")]
        if ok:
            per_group = self.num_experts // groups
            checks.append((chosen * per_group >= self.num_experts_per_tok,
                           "topk_group groups must hold at least num_experts_per_tok experts"))
            if self.topk_method == "noaux_tc":  # a group scores as its two best experts
                checks.append((per_group >= 2, "noaux_tc needs at least 2 experts per group"))
        return checks

    def _mla_checks(self) -> list[tuple[bool, str]]:
        if self.attention_kind != "mla":
            return []
        return [
            (self.kv_lora_rank > 0 and self.v_head_dim > 0 and self.qk_nope_head_dim >= 0,
             "attention_kind 'mla' needs kv_lora_rank > 0, v_head_dim > 0, qk_nope_head_dim >= 0"),
            (self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
             "attention_kind 'mla' needs an even qk_rope_head_dim > 0"),
            (self.head_dim == self.qk_rope_head_dim,
             "attention_kind 'mla' has head_dim = qk_rope_head_dim (RoPE's width)"),
            (self.num_kv_heads == self.num_heads, "attention_kind 'mla' has num_kv_heads = num_heads"),
            (self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank must be None or > 0"),
            (self.position_kind == "rope" and self.qk_norm is None and not self.sliding_window,
             "attention_kind 'mla' runs with RoPE, no qk_norm and no sliding window"),
        ]

    @property
    def is_mla(self) -> bool:
        return self.attention_kind == "mla"

    @property
    def qk_head_dim(self) -> int:
        """Each head's query/key width: the per-head head_dim, or MLA's nope + rope parts."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.dim_per_head

    # Derived sizes, so no caller recomputes them differently.
    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def is_moe(self) -> bool:
        """Whether any layer has a mixture of experts."""
        return self.num_experts > 0 and len(self.mlp_only_layers) < self.num_layers

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.mlp_only_layers

    @property
    def expert_intermediate_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    def is_sliding(self, layer: int) -> bool:
        """Whether ``layer`` attends over the last ``sliding_window`` keys only."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

    def layer_window(self, layer: int) -> int | None:
        return self.sliding_window if self.is_sliding(layer) else None

    @property
    def attention_scale(self) -> float:
        if self.is_mla:  # over the whole query/key width, times YaRN's mscale twice (as HF)
            scale, scaling = self.qk_head_dim**-0.5, self.rope_scaling or {}
            if scaling.get("mscale_all_dim"):
                scale *= _yarn_mscale(float(scaling["factor"]), scaling["mscale_all_dim"]) ** 2
            return scale
        return (self.query_pre_attn_scalar or self.dim_per_head) ** -0.5

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_parameters(self, active: bool = False) -> int:
        """Parameter count of the torch ``Transformer`` built from this config; ``active``: with
        only the ``num_experts_per_tok`` experts a token runs through counted (a mixture of
        experts' active parameters)."""
        h, d, layers = self.hidden_size, self.dim_per_head, self.num_layers
        q, kv = self.num_heads * d, self.kv_heads * d
        attn = h * (q + 2 * kv) + q * h
        if self.attention_bias:
            attn += q + 2 * kv
        if self.attention_out_bias:
            attn += h
        if self.is_mla:
            attn = self._mla_parameters()
        if self.qk_norm == "head":
            attn += 2 * d
        elif self.qk_norm == "projection":
            attn += q + kv
        n_mats = 2 if self.mlp_kind == "gelu" else 3
        mlp = n_mats * h * self.intermediate_size
        if self.mlp_bias:
            mlp += (n_mats - 1) * self.intermediate_size + h
        experts = self.num_experts_per_tok if active else self.num_experts
        experts += self.n_shared_experts  # the shared MLP: as many experts' sizes
        moe = experts * 3 * h * self.expert_intermediate_size + self.num_experts * h  # + router
        mlps = sum(moe if self.is_moe_layer(i) else mlp for i in range(layers))
        norm = h if self.norm_kind == "rms" else 2 * h
        layer_norms = 4 if self.norm_placement == "sandwich" else 2
        total = layers * (attn + layer_norms * norm) + mlps + norm + self.vocab_size * h
        if not self.tie_word_embeddings:
            total += self.vocab_size * h
        if self.position_kind == "learned":
            total += self.max_position_embeddings * h
        return total

    def _mla_parameters(self) -> int:
        h, heads, rank, rope = self.hidden_size, self.num_heads, self.kv_lora_rank, self.qk_rope_head_dim
        bias = self.attention_bias
        q_out = heads * self.qk_head_dim
        if self.q_lora_rank is None:
            q = h * q_out
        else:  # down, its norm, up
            q = h * self.q_lora_rank + bias * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * q_out
        kv = h * (rank + rope) + bias * (rank + rope) + rank + rank * heads * (self.qk_nope_head_dim
                                                                              + self.v_head_dim)
        out = heads * self.v_head_dim * h + self.attention_out_bias * h
        return q + kv + out

    # Our own JSON form: the dataclass fields, nothing else.
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))

    # HF config.json
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        return cls(**fields_from_hf(hf))

    def to_hf_config(self) -> dict[str, Any]:
        return config_to_hf(self)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ModelConfig:
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {directory}: not an HF-format model directory")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_config(hf)
