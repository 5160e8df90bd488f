"""llama.cpp ``deepseek2`` GGUF files (DeepSeek-V2 / V3: multi-head latent attention, a dense
first layer, then routed + shared experts), written here as llama.cpp's converter lays them out
from tiny transformers models (the gguf package's own tensor names; experts stacked into 3-D
tensors; ``kv_b_proj`` whole as older files have it, or split per head into ``attn_k_b``
(transposed) and ``attn_v_b`` with the MLA key/value lengths as newer files have them; YaRN's
mscale_all_dim as 0.1 x ``yarn_log_multiplier``), load into the zoo with the logits of the model
they came from (transformers' own GGUF loader has no deepseek2), and as shipped (Q8_0 2-D and
3-D tensors) with the logits of the same file de-quantized."""


import numpy as np
import pytest
import torch
import transformers

from mlx_core import load_model
from tests.core.test_gguf_archs import _tokenizer, add_tokenizer, write_tensors

pytestmark = pytest.mark.hf_parity

# every width a multiple of 32, so that each 2-D / 3-D tensor quantizes to Q8_0
_TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=128, kv_lora_rank=32,
             qk_nope_head_dim=32, qk_rope_head_dim=8, v_head_dim=16, moe_intermediate_size=32,
             n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
             initializer_range=0.1, tie_word_embeddings=False, bos_token_id=0, eos_token_id=2,
             pad_token_id=0)
_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
         "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
         "mscale": 0.707, "mscale_all_dim": 0.707}
CASES = {  # version, config changes, kv_b_proj form ("whole": attn_kv_b; "split": attn_k_b/v_b)
    "v2-lite": ("V2", dict(q_lora_rank=None, n_shared_experts=2), "whole"),
    "v2-q-lora-groups": ("V2", dict(q_lora_rank=32, topk_method="group_limited_greedy", n_group=2,
                                    topk_group=1, routed_scaling_factor=1.5, n_shared_experts=1),
                         "split"),
    "v3": ("V3", dict(q_lora_rank=32, n_group=2, topk_group=1, n_shared_experts=1), "split"),
    "v3-yarn-no-q-lora": ("V3", dict(q_lora_rank=None, n_group=1, topk_group=1,
                                     n_shared_experts=1, rope_parameters=_YARN), "whole"),
}


def _source_model(case: str, tok):
    version, changes, _ = CASES[case]
    config = getattr(transformers, f"Deepseek{version}Config")(
        vocab_size=tok.get_vocab_size(), **{**_TINY, **changes})
    torch.manual_seed(0)
    hf = getattr(transformers, f"Deepseek{version}ForCausalLM")(config).eval()
    with torch.no_grad():  # norms and V3's routing bias away from their one / zero init
        for name, p in [*hf.named_parameters(), *hf.named_buffers()]:
            if "norm" in name or name.endswith("e_score_correction_bias"):
                p.add_(0.2 * torch.randn_like(p))
    return hf


def _checkpoint(hf, directory) -> dict[str, np.ndarray]:
    """The HF checkpoint's tensors, as llama.cpp's converter reads them (experts one by one)."""
    from safetensors.numpy import load_file

    hf.save_pretrained(directory)
    return load_file(str(directory / "model.safetensors"))


def _gguf_tensors(hf, state: dict[str, np.ndarray], kv_form: str):
    """HF name -> array, llama.cpp's way: experts stacked, kv_b_proj whole or split."""
    c = hf.config
    out = {}
    for name, array in state.items():
        if ".mlp.experts." in name:
            continue
        if name.endswith("e_score_correction_bias"):
            out[name.replace("e_score_correction_bias", "e_score_correction.bias")] = array
        elif name.endswith("kv_b_proj.weight") and kv_form == "split":
            nope, v_dim = c.qk_nope_head_dim, c.v_head_dim
            kv_b = array.reshape(c.num_attention_heads, nope + v_dim, -1)
            out[name.replace("kv_b_proj", "k_b_proj")] = np.ascontiguousarray(
                kv_b[:, :nope].transpose(0, 2, 1))  # [heads, kv_lora_rank, nope]
            out[name.replace("kv_b_proj", "v_b_proj")] = np.ascontiguousarray(kv_b[:, nope:])
        else:
            out[name] = array
    for layer in range(c.first_k_dense_replace, c.num_hidden_layers):
        for projection in ("gate_proj", "up_proj", "down_proj"):
            out[f"model.layers.{layer}.mlp.experts.{projection}.weight"] = np.stack([
                state[f"model.layers.{layer}.mlp.experts.{i}.{projection}.weight"]
                for i in range(c.n_routed_experts)])
    return out


def _write_gguf(path, hf, tok, state, kv_form: str, quantized=None, drop=()):
    """``quantized``: a gguf.GGMLQuantizationType for the 2-D and 3-D tensors (else all F32);
    ``drop``: GGUF tensors left out."""
    import gguf

    c = hf.config
    writer = gguf.GGUFWriter(str(path), "deepseek2")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    rope = c.rope_parameters
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_leading_dense_block_count(c.first_k_dense_replace)
    if c.q_lora_rank is not None:
        writer.add_q_lora_rank(c.q_lora_rank)
    writer.add_kv_lora_rank(c.kv_lora_rank)
    qk_head_dim = c.qk_nope_head_dim + c.qk_rope_head_dim
    if kv_form == "split":  # newer converters: attention as llama.cpp runs it, MQA over the latent
        writer.add_head_count_kv(1)
        writer.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
        writer.add_value_length(c.kv_lora_rank)
        writer.add_key_length_mla(qk_head_dim)
        writer.add_value_length_mla(c.v_head_dim)
    else:
        writer.add_head_count_kv(c.num_attention_heads)
        writer.add_key_length(qk_head_dim)
        writer.add_value_length(c.v_head_dim)
    writer.add_rope_dimension_count(c.qk_rope_head_dim)
    writer.add_expert_feed_forward_length(c.moe_intermediate_size)
    writer.add_expert_count(c.n_routed_experts)
    writer.add_expert_used_count(c.num_experts_per_tok)
    writer.add_expert_shared_count(c.n_shared_experts)
    writer.add_expert_weights_scale(c.routed_scaling_factor)
    writer.add_expert_weights_norm(bool(c.norm_topk_prob))
    v3 = isinstance(c, transformers.DeepseekV3Config)  # sigmoid scores; V2's softmax
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if v3
                                  else gguf.ExpertGatingFuncType.SOFTMAX)
    if getattr(c, "n_group", None) is not None:
        writer.add_expert_group_count(c.n_group)
        writer.add_expert_group_used_count(c.topk_group)
    if rope.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        writer.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
        writer.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    add_tokenizer(writer, tok)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, c.num_hidden_layers)
    tensors = {}
    for name, array in _gguf_tensors(hf, state, kv_form).items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        if gguf_name not in drop:
            tensors[gguf_name] = array
    write_tensors(writer, tensors, quantized)
    return path


def _ids(hf, length=17, seed=1):
    return torch.randint(0, hf.config.vocab_size, (2, length),
                         generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_the_source_model(tmp_path, case):
    tok = _tokenizer()
    hf = _source_model(case, tok)
    state = _checkpoint(hf, tmp_path / "hf")
    path = _write_gguf(tmp_path / f"{case}.gguf", hf, tok, state, CASES[case][2])
    ours = load_model(path)
    assert ours.config.model_type == f"deepseek_{CASES[case][0].lower()}"
    assert ours.config.mlp_only_layers == (0,)
    ids = _ids(hf)
    assert (ours(ids) - hf(ids).logits).abs().max() < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("case", ["v2-lite", "v3"])
def test_shipped_quantized_equals_dequantized(tmp_path, case):
    """Q8_0 files (every 2-D and 3-D tensor, routers included) loaded as shipped: the stacked
    experts split into per-expert int8 layers, attn_kv_b kept quantized; the routers and a split
    kv_b_proj read de-quantized (full precision): the logits of the file de-quantized."""
    import gguf

    from mlx_core.models.moe import Router
    from mlx_core.transforms import Int8Linear

    tok = _tokenizer()
    hf = _source_model(case, tok)
    kv_form = CASES[case][2]
    path = _write_gguf(tmp_path / f"{case}-q8.gguf", hf, tok, _checkpoint(hf, tmp_path / "hf"),
                       kv_form, gguf.GGMLQuantizationType.Q8_0)
    shipped, dequantized = load_model(path, quantization="gguf"), load_model(path)
    moe = shipped.model.layers[1].mlp
    assert isinstance(moe.experts[3].down_proj, Int8Linear)
    assert isinstance(moe.shared_experts.gate_proj, Int8Linear)
    assert type(moe.gate) is Router
    attention = shipped.model.layers[1].self_attn
    assert isinstance(attention.kv_b_proj, Int8Linear) == (kv_form == "whole")
    assert isinstance(attention.kv_a_proj_with_mqa, Int8Linear)
    assert isinstance(shipped.model.layers[0].mlp.up_proj, Int8Linear)
    ids = _ids(hf, length=11, seed=2)
    assert (shipped(ids) - dequantized(ids)).abs().max() < 1e-3


def test_a_split_kv_b_missing_its_other_half_is_named(tmp_path):
    tok = _tokenizer()
    hf = _source_model("v3", tok)
    path = _write_gguf(tmp_path / "m.gguf", hf, tok, _checkpoint(hf, tmp_path / "hf"), "split",
                       drop=("blk.2.attn_v_b.weight",))
    with pytest.raises(ValueError, match=r"blk\.2\.attn_v_b\.weight is missing"):
        load_model(path)


@pytest.mark.parametrize("key,value,message", [
    ("deepseek2.expert_gating_func", 3, "expert_gating_func 3 is not supported"),
    ("deepseek2.attention.temperature_scale", 0.1, "temperature_scale is not supported"),
])
def test_metadata_the_zoo_cannot_follow_is_named(tmp_path, key, value, message):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "deepseek2")
    for name, v in {"block_count": 1, "embedding_length": 4, "feed_forward_length": 4,
                    "attention.head_count": 1, "attention.kv_lora_rank": 4,
                    "rope.dimension_count": 2, "attention.key_length": 4,
                    "attention.value_length": 4}.items():
        writer.add_uint32(f"deepseek2.{name}", v)
    (writer.add_uint32 if isinstance(value, int) else writer.add_float32)(key, value)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=message):
        load_model(tmp_path / "m.gguf")
