"""llama.cpp's ``deepseek2`` GGUF files (DeepSeek-V2, V2-Lite, V3: multi-head latent attention
over DeepSeekMoE) -> the HF DeepSeek-V2/V3 names and ``config.json`` that the zoo reads
(``mlx_core.hf_deepseek``), for ``gguf_convert`` (fp32) and ``gguf_blocks`` (as shipped).

What llama.cpp's converter does to HF's checkpoint, undone here:

- Each MoE layer's routed experts are stacked into one 3-D tensor per projection
  (``ffn_{gate,up,down}_exps``, ``[experts, rows, cols]``): split again into
  ``mlp.experts.N.*``, by rows, so quantized layouts split as fp32 ones do.
- ``kv_b_proj`` (per head: ``qk_nope_head_dim`` key rows, then ``v_head_dim`` value rows) is
  kept whole (``attn_kv_b``, older files) or, in newer files, split per head into ``attn_k_b``
  (its key rows transposed: ``[heads, kv_lora_rank, qk_nope_head_dim]``) and ``attn_v_b``
  (``[heads, v_head_dim, kv_lora_rank]``), which are put back together into ``kv_b_proj``'s
  rows. A quantized ``attn_k_b`` has its blocks along the other axis, so the as-shipped reader
  reads both halves de-quantized (``kv_b_proj`` loads in full precision); a file that also
  holds ``attn_kv_b`` (some do) loads that one instead.
- V3's ``e_score_correction_bias`` is ``exp_probs_b.bias``; the routers (``ffn_gate_inp``) are
  read de-quantized where a file has them quantized, as the zoo keeps routers in full
  precision when it quantizes a model itself.
- No Q/K rows are permuted: llama.cpp's RoPE for ``deepseek2`` turns adjacent pairs, which is
  how DeepSeek's checkpoints lay out their rope dimensions (``rope_interleave``) already.

The metadata: ``expert_gating_func`` sigmoid (2) is DeepSeek-V3 (``noaux_tc`` routing with the
bias), softmax (1, or absent, as llama.cpp reads older files) DeepSeek-V2 (``greedy``, or
``group_limited_greedy`` over more than one expert group). Newer files describe attention as
llama.cpp runs it (multi-query over the latent: ``key_length`` = ``kv_lora_rank`` +
``qk_rope_head_dim``) and keep the per-head sizes in ``key_length_mla`` / ``value_length_mla``;
older ones have the per-head sizes in ``key_length`` / ``value_length``. The converter writes
YaRN's ``mscale_all_dim`` times 0.1 as ``rope.scaling.yarn_log_multiplier``, and llama.cpp runs
it with ``mscale`` equal to ``mscale_all_dim`` (what DeepSeek's configs have).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
_ATTN, _MLP = "model.layers.{}.self_attn.", "model.layers.{}.mlp."
_PROJECTIONS = ("gate", "up", "down")
# GGUF name -> HF name, beyond what every architecture has (attn_q: q_proj without q-LoRA;
# ffn_gate/up/down: the dense layers' MLP). k_b_proj / v_b_proj are merged into kv_b_proj and
# mlp.experts.{p}_proj (3-D) split per expert by ``assemble``.
NAMES = {
    "blk.{}.attn_q_a.weight": _ATTN + "q_a_proj.weight",
    "blk.{}.attn_q_a_norm.weight": _ATTN + "q_a_layernorm.weight",
    "blk.{}.attn_q_b.weight": _ATTN + "q_b_proj.weight",
    "blk.{}.attn_kv_a_mqa.weight": _ATTN + "kv_a_proj_with_mqa.weight",
    "blk.{}.attn_kv_a_norm.weight": _ATTN + "kv_a_layernorm.weight",
    "blk.{}.attn_kv_b.weight": _ATTN + "kv_b_proj.weight",
    "blk.{}.attn_k_b.weight": _ATTN + "k_b_proj.weight",
    "blk.{}.attn_v_b.weight": _ATTN + "v_b_proj.weight",
    "blk.{}.ffn_gate_inp.weight": _MLP + "gate.weight",
    "blk.{}.exp_probs_b.bias": _MLP + "gate.e_score_correction_bias",
    **{f"blk.{{}}.ffn_{p}_exps.weight": _MLP + f"experts.{p}_proj.weight" for p in _PROJECTIONS},
    **{f"blk.{{}}.ffn_{p}_shexp.weight": _MLP + f"shared_experts.{p}_proj.weight"
       for p in _PROJECTIONS},
}
ABSENT = ("blk.{}.attn_k.weight", "blk.{}.attn_v.weight")  # MLA has no per-head k/v projections
# HF names the as-shipped reader reads de-quantized (fp32) whatever their type
READ_DEQUANTIZED = ("self_attn.k_b_proj.weight", "self_attn.v_b_proj.weight", "mlp.gate.weight")

_GATING = {1: "softmax", 2: "sigmoid"}  # gguf.ExpertGatingFuncType
_YARN_LOG_MUL = 0.1  # the converter's factor on mscale_all_dim
# metadata that would change what the model computes, and that the zoo's DeepSeek cannot say
_UNREAD_KEYS = ("attention.temperature_scale", "attention.temperature_length",
                "rope.scaling.yarn_attn_factor", "rope.scaling.yarn_ext_factor",
                "rope.scaling.attn_factor")


def hf_fields(get: Callable[..., Any]) -> dict[str, Any]:
    """The DeepSeek fields of ``config.json`` (model_type, MLA sizes, experts, RoPE scaling)
    from a ``deepseek2`` file's metadata (``get(key, default)``: ``deepseek2.{key}``)."""
    for key in _UNREAD_KEYS:
        if get(key) is not None:
            raise ValueError(f"GGUF metadata deepseek2.{key} is not supported: the zoo's "
                             "DeepSeek-V2/V3 has no such setting")
    gating = get("expert_gating_func", 1)
    if gating not in _GATING:
        raise ValueError(f"GGUF deepseek2.expert_gating_func {gating} is not supported; "
                         "supported: 1 (softmax, DeepSeek-V2), 2 (sigmoid, DeepSeek-V3)")
    v3 = _GATING[gating] == "sigmoid"
    rank, rope_dim = get("attention.kv_lora_rank"), get("rope.dimension_count")
    if rank is None or rope_dim is None:
        raise ValueError("GGUF deepseek2 metadata needs attention.kv_lora_rank and "
                         "rope.dimension_count")
    key_length = get("attention.key_length_mla", get("attention.key_length"))
    value_length = get("attention.value_length_mla", get("attention.value_length"))
    groups, groups_used = get("expert_group_count"), get("expert_group_used_count")
    experts = get("expert_count") or 0
    fields = {
        "model_type": MODEL_TYPES[v3],
        "q_lora_rank": get("attention.q_lora_rank") or None,
        "kv_lora_rank": rank,
        "qk_rope_head_dim": rope_dim,
        "qk_nope_head_dim": key_length - rope_dim,
        "v_head_dim": value_length,
        "n_routed_experts": experts or None,
        "num_experts_per_tok": get("expert_used_count"),
        "moe_intermediate_size": get("expert_feed_forward_length"),
        "n_shared_experts": get("expert_shared_count", 0),
        "first_k_dense_replace": get("leading_dense_block_count", 0),
        "moe_layer_freq": 1,
        # llama.cpp scales by expert_weights_scale only where the file has it
        "routed_scaling_factor": float(get("expert_weights_scale", 1.0)),
        "norm_topk_prob": bool(get("expert_weights_norm", False)),
        "scoring_func": _GATING[gating],
        "attention_bias": False,
    }
    if v3:  # no groups in the file: one group (HF's V3 defaults to 8)
        fields.update(topk_method="noaux_tc", n_group=groups or 1, topk_group=groups_used or 1,
                      rope_interleave=True)
    else:
        fields.update(topk_method="group_limited_greedy" if (groups or 1) > 1 else "greedy",
                      n_group=groups, topk_group=groups_used)
    scaling = _rope_scaling(get)
    if scaling is not None:
        fields["rope_scaling"] = scaling
    return fields


def _rope_scaling(get: Callable[..., Any]) -> dict[str, Any] | None:
    kind = get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind != "yarn":
        raise ValueError(f"GGUF deepseek2 rope scaling {kind!r} is not supported yet "
                         "(yarn only)")
    scaling = {"rope_type": "yarn", "factor": float(get("rope.scaling.factor")),
               "original_max_position_embeddings": get("rope.scaling.original_context_length")}
    for key in ("beta_fast", "beta_slow"):
        if get(f"rope.scaling.yarn_{key}") is not None:
            scaling[key] = float(get(f"rope.scaling.yarn_{key}"))
    log_mul = get("rope.scaling.yarn_log_multiplier")
    if log_mul:  # mscale_all_dim * 0.1 in float32: back to the config's decimals
        mscale = round(float(log_mul) / _YARN_LOG_MUL, 6)
        scaling.update(mscale=mscale, mscale_all_dim=mscale)
    return scaling


_KV_B = re.compile(r"(model\.layers\.\d+\.self_attn)\.([kv])_b_proj\.weight")
_STACKED = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)"
                      r"\.(weight|qweight|scale|scales|mins)")


def assemble(config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    """In place: ``kv_b_proj`` rebuilt from the split ``k_b_proj`` / ``v_b_proj`` halves (fp32
    ``.weight``), and each stacked expert tensor (fp32 ``.weight`` ``[experts, rows, cols]`` or a
    quantized layout's per-row parts, each ``[experts, rows, ...]``) split into
    ``mlp.experts.N.*``."""
    heads, rank = config["num_attention_heads"], config["kv_lora_rank"]
    nope, v_dim = config["qk_nope_head_dim"], config["v_head_dim"]
    halves: dict[str, dict[str, np.ndarray]] = {}
    for name in [n for n in tensors if _KV_B.fullmatch(n)]:
        m = _KV_B.fullmatch(name)
        halves.setdefault(m.group(1), {})[m.group(2)] = tensors.pop(name)
    for attention, parts in halves.items():
        if any(k.startswith(f"{attention}.kv_b_proj.") for k in tensors):
            continue  # the file holds kv_b_proj whole as well: the halves are the same values
        if len(parts) != 2:
            layer = attention.split(".")[2]
            missing = "attn_v_b" if "k" in parts else "attn_k_b"
            raise ValueError(f"GGUF tensor blk.{layer}.{missing}.weight is missing: "
                             f"kv_b_proj is rebuilt from attn_k_b and attn_v_b together")
        k_b = parts["k"].reshape(heads, rank, nope).transpose(0, 2, 1)  # [heads, nope, rank]
        v_b = parts["v"].reshape(heads, v_dim, rank)
        tensors[f"{attention}.kv_b_proj.weight"] = np.ascontiguousarray(
            np.concatenate([k_b, v_b], axis=1).reshape(heads * (nope + v_dim), rank))
    for name in [n for n in tensors if _STACKED.fullmatch(n)]:
        prefix, projection, suffix = _STACKED.fullmatch(name).groups()
        stacked = tensors.pop(name)
        if stacked.ndim != 3:
            raise ValueError(f"stacked experts {name} should be 3-D [experts, rows, "
                             f"cols], got shape {stacked.shape}")
        for i, expert in enumerate(stacked):
            tensors[f"{prefix}.{i}.{projection}.{suffix}"] = np.ascontiguousarray(expert)
