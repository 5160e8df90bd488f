"""Parity with HF transformers: tiny random HF models load into the zoo with the same logits.

Tolerance: 1e-4 max-abs on fp32 logits (the issue's bar); saving back gives bit-identical HF logits.
"""

import pytest
import torch
import transformers

from mlx_core import generate, load_model, save_model

pytestmark = pytest.mark.hf_parity

_TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

FAMILIES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**_TINY)),
    "llama3-rope-scaling": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        **_TINY)),
    # YaRN: a ramp across the head's dimensions (original context short enough that it is not
    # all one side) and cos/sin times its attention factor; with mscale/mscale_all_dim as well
    "llama-yarn": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        **_TINY)),
    "qwen2-yarn-mscale": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        rope_scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                      "beta_fast": 16, "mscale": 1.0, "mscale_all_dim": 0.5},
        **_TINY)),
    # the length-dependent types (LENGTH_DEPENDENT below), with the switch inside the test
    # inputs' lengths; weights larger than HF's init so that the tables show in greedy tokens.
    # Dynamic NTK: the base grows past max_position_embeddings (16)
    "llama-dynamic-rope": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        rope_scaling={"rope_type": "dynamic", "factor": 4.0}, initializer_range=0.2,
        **{**_TINY, "max_position_embeddings": 16})),
    # LongRoPE: short factors up to original_max_position_embeddings (16), long ones past it,
    # cos/sin times sqrt(1 + ln(256 / 16) / ln 16) at every length
    "phi3-longrope": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(
        pad_token_id=0, bos_token_id=1, eos_token_id=2, original_max_position_embeddings=16,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0 + 0.3 * i for i in range(8)],
                      "long_factor": [1.0 + 2.0 * i for i in range(8)]},
        initializer_range=0.2, **_TINY)),
    # LongRoPE on a Llama: HF's Llama generation keeps the short-factor keys it cached
    "llama-longrope": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        rope_scaling={"rope_type": "longrope", "original_max_position_embeddings": 16,
                      "short_factor": [1.0 + 0.3 * i for i in range(8)],
                      "long_factor": [1.0 + 2.0 * i for i in range(8)]},
        initializer_range=0.2, **_TINY)),
    "llama-tied-smollm2-like": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(tie_word_embeddings=True, rope_theta=100000.0, **_TINY)),
    "mistral-sliding-window": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(sliding_window=6, **_TINY)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(tie_word_embeddings=True, **_TINY)),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(tie_word_embeddings=True, head_dim=32, **_TINY)),
    "qwen3-untied-bias": lambda: transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(attention_bias=True, **_TINY)),
    "olmo2": lambda: transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**_TINY)),
    "olmo2-bias-tied": lambda: transformers.Olmo2ForCausalLM(
        transformers.Olmo2Config(attention_bias=True, tie_word_embeddings=True, **_TINY)),
    "phi3": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(
        pad_token_id=0, bos_token_id=1, eos_token_id=2, **_TINY)),
    "phi3-sliding-window": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(
        pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=6, **_TINY)),
    # a window shorter than the test inputs, a query scale other than head_dim's, and norm
    # weights away from their zero init, so that each Gemma 3 difference shows in the logits
    "gemma3": lambda: _norms_perturbed(transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
        layer_types=["sliding_attention", "full_attention"], **_TINY))),
    # soft-capped scores and logits (small caps, so that they bite on random weights)
    "gemma2": lambda: _norms_perturbed(transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=6, attn_logit_softcapping=1.5,
        final_logit_softcapping=0.5, **_TINY))),
    "gemma3-linear-rope-untied": lambda: _norms_perturbed(transformers.Gemma3ForCausalLM(
        transformers.Gemma3TextConfig(
            head_dim=32, sliding_window=5, tie_word_embeddings=False, num_hidden_layers=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
            **{k: v for k, v in _TINY.items() if k != "num_hidden_layers"}))),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)),
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        num_local_experts=4, num_experts_per_tok=2, **_TINY)),
    # Qwen3-MoE: experts of moe_intermediate_size, top-k weights renormalised or not, dense
    # layers among the sparse ones (decoder_sparse_step, mlp_only_layers), GQA ratios 2, 4, 1
    "qwen3-moe": lambda: _qwen3_moe(norm_topk_prob=True, head_dim=32),
    "qwen3-moe-tied-sparse-step": lambda: _qwen3_moe(
        tie_word_embeddings=True, decoder_sparse_step=2, num_hidden_layers=3,
        num_key_value_heads=1, num_experts=6, num_experts_per_tok=3),
    "qwen3-moe-mlp-only-bias-window": lambda: _qwen3_moe(
        norm_topk_prob=True, mlp_only_layers=[0], num_key_value_heads=4, attention_bias=True,
        use_sliding_window=True, sliding_window=6),
    # DeepSeek-V2/V3: multi-head latent attention with plain queries or a q bottleneck, RoPE
    # pairs interleaved or not, YaRN's mscale in the softmax scale; dense first layers, routed
    # experts (V2: softmax, greedy or group-limited, scaled; V3: sigmoid with a random correction
    # bias, noaux_tc over groups) plus shared experts. Weights at std 0.1, so routing matters.
    "deepseek-v2": lambda: _deepseek("V2", q_lora_rank=None, n_shared_experts=2),
    "deepseek-v2-q-lora-group-limited": lambda: _deepseek(
        "V2", q_lora_rank=24, topk_method="group_limited_greedy", n_group=2, topk_group=1,
        routed_scaling_factor=1.5, n_shared_experts=1, num_hidden_layers=3),
    "deepseek-v3": lambda: _deepseek("V3", q_lora_rank=24, n_group=2, topk_group=1),
    "deepseek-v3-yarn-not-interleaved-all-sparse": lambda: _deepseek(
        "V3", q_lora_rank=None, rope_interleave=False, first_k_dense_replace=0, n_group=1,
        topk_group=1, norm_topk_prob=False, attention_bias=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}),
}

_TINY_DEEPSEEK = dict(
    _TINY, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=12, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
    first_k_dense_replace=1, initializer_range=0.1)


def _deepseek(version, **changes):
    config = getattr(transformers, f"Deepseek{version}Config")(**{**_TINY_DEEPSEEK, **changes})
    model = getattr(transformers, f"Deepseek{version}ForCausalLM")(config)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # zero at init: make it choose
                buffer.normal_(0.0, 0.1)
    return model


@torch.no_grad()
def test_deepseek_v3_multi_token_prediction_layers_are_left_out(tmp_path):
    """A V3 checkpoint with its MTP module saved as the layer past num_hidden_layers (as the
    released ones: layer 61 of 0-60) loads without it, as HF's does: the same logits."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    hf = _deepseek("V3", q_lora_rank=24, n_group=2, topk_group=1, num_nextn_predict_layers=1).eval()
    hf.save_pretrained(tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    tensors = load_file(path)
    mtp = hf.config.num_hidden_layers
    extra = {f"model.layers.{mtp}.{k.split('.', 3)[3]}": v.clone()
             for k, v in tensors.items() if k.startswith("model.layers.1.")}
    extra.update({f"model.layers.{mtp}.eh_proj.weight": torch.randn(32, 64),
                  f"model.layers.{mtp}.enorm.weight": torch.ones(32)})
    save_file({**tensors, **extra}, str(path), metadata={"format": "pt"})
    ours = load_model(tmp_path)
    ids, _ = _inputs()
    assert (ours(ids) - hf(ids).logits).abs().max() < 1e-4


def _qwen3_moe(**changes):
    config = {**_TINY, "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2,
              **changes}
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**config))


def _norms_perturbed(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model


def _inputs(seed=0, batch=2, length=20, pad_to=13):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, pad_to:] = 0  # right padding on the second row
    return ids, mask


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hf_and_ours(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = FAMILIES[request.param]().eval()
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)
    return request.param, hf, load_model(directory), directory


@torch.no_grad()
def test_logits_match_hf(hf_and_ours):
    _, hf, ours, _ = hf_and_ours
    ids, _ = _inputs()
    assert (ours(ids) - hf(ids).logits).abs().max() < 1e-4


@torch.no_grad()
def test_right_padded_batch_matches_hf(hf_and_ours):
    _, hf, ours, _ = hf_and_ours
    ids, mask = _inputs()
    ref = hf(ids, attention_mask=mask).logits
    got = ours(ids, attention_mask=mask)
    valid = mask.bool()
    assert (got[valid] - ref[valid]).abs().max() < 1e-4


def test_loss_and_gradients_match_hf(hf_and_ours):
    _, hf, ours, _ = hf_and_ours
    ids, mask = _inputs(seed=1)
    labels = ids.masked_fill(mask == 0, -100)
    ref = hf(ids, attention_mask=mask, labels=labels).loss
    got = ours(ids, attention_mask=mask, labels=labels)
    assert abs(got.item() - ref.item()) < 1e-5
    ref.backward()
    got.backward()
    hf_grad = hf.get_input_embeddings().weight.grad
    our_grad = ours.model.embed_tokens.weight.grad
    assert (hf_grad - our_grad).abs().max() < 1e-5
    hf.zero_grad(), ours.zero_grad()


@torch.no_grad()
def test_save_model_round_trips_to_hf(hf_and_ours, tmp_path):
    name, hf, ours, _ = hf_and_ours
    save_model(ours, tmp_path / "saved")
    reloaded = type(hf).from_pretrained(tmp_path / "saved").eval()
    ids, mask = _inputs(seed=2)
    assert torch.equal(reloaded(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits)


LENGTH_DEPENDENT = ["llama-dynamic-rope", "phi3-longrope", "llama-longrope"]


@pytest.fixture(params=LENGTH_DEPENDENT)
def length_dependent(request, tmp_path_factory):
    """A fresh HF model per use: HF's dynamic NTK keeps the longest table it built until a
    sequence shorter than max_position_embeddings resets it; ours is per forward."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp(request.param)
    hf = FAMILIES[request.param]()
    hf.save_pretrained(directory)
    return lambda: type(hf).from_pretrained(directory).eval(), load_model(directory)


@torch.no_grad()
@pytest.mark.parametrize("length", [5, 16, 17, 30])
def test_length_dependent_rope_matches_hf_on_both_sides_of_the_switch(length_dependent, length):
    fresh_hf, ours = length_dependent
    ids = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(length))
    assert (ours(ids) - fresh_hf()(ids).logits).abs().max() < 1e-4


@torch.no_grad()
def test_length_dependent_rope_greedy_generation_matches_hf_across_the_switch(length_dependent):
    """Prompts shorter than the switch (16) that generate past it, one at it, one past it, and
    a left-padded batch; eager and compiled decoding. HF's cached generation keeps each key's
    table (dynamic NTK, LongRoPE on a Llama), or computes every token again once past the
    switch (Phi-3)."""
    fresh_hf, ours = length_dependent
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (4, 11, 16, 20)]
    options = dict(max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    for prompt in prompts:
        ref = fresh_hf().generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                                  **options)[0, len(prompt):].tolist()
        assert generate(ours, prompt, max_new_tokens=16, stop_token_ids=[]) == ref
    batch = prompts[:2]
    ids, mask = torch.zeros(2, 11, dtype=torch.long), torch.zeros(2, 11, dtype=torch.long)
    for row, prompt in enumerate(batch):
        ids[row, 11 - len(prompt):], mask[row, 11 - len(prompt):] = torch.tensor(prompt), 1
    ref = fresh_hf().generate(ids, attention_mask=mask, **options)[:, 11:].tolist()
    assert generate(ours, batch, max_new_tokens=16, stop_token_ids=[]) == ref
    assert generate(ours, batch, max_new_tokens=16, stop_token_ids=[], compile=True) == ref


@pytest.mark.parametrize("preset,hf_class,published", [
    ("qwen3-30b-a3b", transformers.Qwen3MoeForCausalLM, 30_532_122_624),  # "30.5B"
    ("mixtral-8x7b", transformers.MixtralForCausalLM, 46_702_792_704),  # "46.7B"
    ("deepseek-v2-lite", transformers.DeepseekV2ForCausalLM, 15_706_484_224),  # "15.7B"
])
def test_real_size_preset_has_the_published_parameter_count(preset, hf_class, published):
    """The preset's config, written as config.json and built by transformers on the meta device,
    has the parameters the zoo's model (and ``num_parameters``) has."""
    from mlx_core import get_preset
    from mlx_core.models.transformer import Transformer

    config = get_preset(preset)
    hf_config = hf_class.config_class(**config.to_hf_config())
    with torch.device("meta"):
        theirs = sum(p.numel() for p in hf_class(hf_config).parameters())
        ours = Transformer(config).num_parameters()
    assert theirs == ours == config.num_parameters() == published
