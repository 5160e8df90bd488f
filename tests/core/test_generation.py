"""Generation with the contiguous KV cache: HF greedy parity, batching, streaming, sampling."""

import pytest
import torch
import transformers

from mlx_core import generate, load_model, stream_generate
from mlx_core.models.generation import sample_next
from mlx_core.models.loading import build_model
from mlx_core.presets import get_preset


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(get_preset("tiny-llama")).eval()


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in (7, 3, 12)]


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-mistral", "tiny-gpt2", "tiny-mixtral",
                                    "tiny-qwen3-moe", "tiny-deepseek-v2", "tiny-deepseek-v3"])
@torch.no_grad()
def test_cached_decoding_matches_full_forward(preset):
    torch.manual_seed(0)
    model = build_model(get_preset(preset)).eval()
    ids = torch.randint(0, 128, (2, 14))
    full = model(ids)
    cache = model.new_cache(2, 14)
    steps = [model(ids[:, :9], kv_cache=cache)]
    steps += [model(ids[:, t:t + 1], kv_cache=cache) for t in range(9, 14)]
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5


@pytest.mark.hf_parity
def test_greedy_matches_hf_generate(tmp_path):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)).eval()
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    for prompt in _prompts():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert generate(ours, prompt, max_new_tokens=16, stop_token_ids=[]) == ref


_TINY_HF = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
_TINY_DEEPSEEK = dict(_TINY_HF, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=16,
                      qk_rope_head_dim=8, v_head_dim=12, moe_intermediate_size=32,
                      n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
                      initializer_range=0.1)
MOE_FAMILIES = {
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        num_local_experts=4, num_experts_per_tok=2, **_TINY_HF)),
    "qwen3-moe": lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        mlp_only_layers=[1], **_TINY_HF)),
    # multi-head latent attention: its cache holds the latent, as HF's does
    "deepseek-v2": lambda: transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(
        q_lora_rank=None, topk_method="group_limited_greedy", n_group=2, topk_group=1,
        **_TINY_DEEPSEEK)),
    "deepseek-v3": lambda: transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        q_lora_rank=24, n_group=2, topk_group=1, **_TINY_DEEPSEEK)),
}


@pytest.mark.hf_parity
@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_moe_greedy_matches_hf_generate(family, tmp_path):
    """Mixtures of experts: a batch of prompts (left-padded) gives HF's greedy tokens for each
    prompt alone."""
    torch.manual_seed(0)
    hf = MOE_FAMILIES[family]().eval()
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    refs = [hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                        pad_token_id=0)[0, len(p):].tolist() for p in _prompts()]
    assert generate(ours, _prompts(), max_new_tokens=16, stop_token_ids=[]) == refs


def test_left_padded_batch_equals_one_by_one(tiny):
    prompts = _prompts()
    batched = generate(tiny, prompts, max_new_tokens=10, stop_token_ids=[])
    assert batched == [generate(tiny, p, max_new_tokens=10, stop_token_ids=[]) for p in prompts]


def test_stream_equals_generate(tiny):
    prompt = _prompts()[0]
    assert list(stream_generate(tiny, prompt, max_new_tokens=8, stop_token_ids=[])) == generate(
        tiny, prompt, max_new_tokens=8, stop_token_ids=[])


def test_stops_after_stop_token(tiny):
    prompt = _prompts()[0]
    free = generate(tiny, prompt, max_new_tokens=10, stop_token_ids=[])
    stop = free[4]
    out = generate(tiny, prompt, max_new_tokens=10, stop_token_ids=[stop])
    assert out == free[: free.index(stop) + 1]


def test_seeded_sampling_is_reproducible_and_filters(tiny):
    prompt = _prompts()[1]
    a = generate(tiny, prompt, max_new_tokens=12, temperature=1.0, seed=7, stop_token_ids=[])
    b = generate(tiny, prompt, max_new_tokens=12, temperature=1.0, seed=7, stop_token_ids=[])
    assert a == b
    greedy = generate(tiny, prompt, max_new_tokens=12, stop_token_ids=[])
    assert generate(tiny, prompt, max_new_tokens=12, temperature=0.7, top_k=1, seed=1,
                    stop_token_ids=[]) == greedy
    assert generate(tiny, prompt, max_new_tokens=12, temperature=0.7, top_p=1e-6, seed=1,
                    stop_token_ids=[]) == greedy


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {int(sample_next(logits, temperature=1.0, top_p=0.8,
                            generator=torch.Generator().manual_seed(s))) for s in range(200)}
    assert seen == {0, 1}


def test_bad_options_name_the_problem(tiny):
    with pytest.raises(ValueError, match="top_p"):
        generate(tiny, [1, 2], top_p=0.0)
    with pytest.raises(ValueError, match="at least one token"):
        generate(tiny, [[1], []])


def test_inputs_embeds_equal_input_ids(tiny):
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        assert torch.equal(tiny(inputs_embeds=tiny.model.embed_tokens(ids)), tiny(ids))
    with pytest.raises(ValueError, match="exactly one"):
        tiny()


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = build_model(get_preset("tiny-llama")).train()  # checkpointing is for training only
    ids = torch.randint(0, 128, (2, 9))
    grads = []
    for enable in (False, True):
        model.gradient_checkpointing_enable(enable)
        model.zero_grad()
        model(ids, labels=ids).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_checkpointing_the_first_layers_recomputes_only_those():
    torch.manual_seed(0)
    model = build_model(get_preset("tiny-llama")).train()
    assert len(model.model.layers) >= 2
    ids = torch.randint(0, 128, (2, 9))
    model.zero_grad()
    model(ids, labels=ids).backward()
    reference = [p.grad.clone() for p in model.parameters()]
    calls = [0] * len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        # a pre-hook: the recompute stops early once it has what backward needs
        layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    model.gradient_checkpointing_enable(num_layers=1)
    model.zero_grad()
    model(ids, labels=ids).backward()
    assert calls == [2] + [1] * (len(calls) - 1)  # forward everywhere, a recompute in layer 0
    for a, p in zip(reference, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match=f"has {len(calls)} decoder layers"):
        model.gradient_checkpointing_enable(num_layers=len(calls) + 1)
