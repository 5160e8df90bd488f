"""The engine end to end on tiny models: greedy outputs token-for-token equal to HF `generate`
on each prompt alone (every zoo family; with prefix caching, forced chunked prefill and forced
preemption), stops, n, seeds, logprobs, aborts, errors; no KV block leaks after any of it."""

import pytest
import torch
import transformers

from mlx_core import load_model
from mlx_core.models.moe import Router
from mlx_serve import LLM, LLMEngine, SamplingParams
from mlx_serve.config import EngineConfig, parse_memory

SPECULATIVE = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2,
               "prompt_lookup_min": 1}
_TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
_TINY_DEEPSEEK = dict(_TINY, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=16,
                      qk_rope_head_dim=8, v_head_dim=12, moe_intermediate_size=32,
                      n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
                      initializer_range=0.1)
FAMILIES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**_TINY)),
    "llama-yarn": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        **_TINY)),
    # RoPE tables that depend on the length, on weights large enough that the tables show in
    # greedy tokens: dynamic NTK past 24 tokens (prompts of 14, 18 and 23 pass it while
    # generating, 30 starts past it; the engine takes 4 x 24 tokens by default), Phi-3's
    # LongRoPE past 16 (prompts of 7 and 14 pass it while generating, and every token is
    # computed again there, as HF's Phi-3 generation does)
    "llama-dynamic-rope": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        rope_scaling={"rope_type": "dynamic", "factor": 4.0}, initializer_range=0.2,
        **{**_TINY, "max_position_embeddings": 24})),
    "phi3-longrope": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(
        pad_token_id=0, bos_token_id=1, eos_token_id=2, original_max_position_embeddings=16,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0 + 0.3 * i for i in range(8)],
                      "long_factor": [1.0 + 2.0 * i for i in range(8)]},
        initializer_range=0.2, **_TINY)),
    "mistral-sliding-window": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(sliding_window=6, **_TINY)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(tie_word_embeddings=True, **_TINY)),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(tie_word_embeddings=True, head_dim=32, **_TINY)),
    "olmo2": lambda: transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**_TINY)),
    "phi3": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(
        pad_token_id=0, bos_token_id=1, eos_token_id=2, **_TINY)),
    # a sliding layer whose window (6) the prompts pass, then a full one; its own RoPE base
    "gemma3": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
        layer_types=["sliding_attention", "full_attention"], **_TINY)),
    "gemma2": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        head_dim=16, sliding_window=6, attn_logit_softcapping=1.5, final_logit_softcapping=3.0,
        **_TINY)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128)),
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        num_local_experts=4, num_experts_per_tok=2, **_TINY)),
    # a sparse layer, then a dense one (mlp_only_layers)
    "qwen3-moe": lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        mlp_only_layers=[1], head_dim=32, **_TINY)),
    # multi-head latent attention (keys 24 wide, values 12), a dense layer then DeepSeekMoE
    "deepseek-v2": lambda: transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(
        q_lora_rank=None, topk_method="group_limited_greedy", n_group=2, topk_group=1,
        **_TINY_DEEPSEEK)),
    "deepseek-v3": lambda: transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        q_lora_rank=24, n_group=2, topk_group=1, **_TINY_DEEPSEEK)),
}
MODES = {
    "default": {},
    "chunked-prefill": dict(max_num_batched_tokens=7),
    "preemption": dict(num_blocks=14, block_size=4),  # 56 slots for ~200 tokens of work
    "no-prefix-caching": dict(enable_prefix_caching=False, block_size=4),
    # n-gram drafts from the sequence's own tokens (tiny random models repeat themselves)
    "speculative": dict(speculative_config=SPECULATIVE),
    "speculative-preemption-chunked": dict(num_blocks=14, block_size=4, max_num_batched_tokens=9,
                                           speculative_config=SPECULATIVE),
}
NEW_TOKENS = 12


def _prompts():
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (7, 3, 23, 14, 30)]
    return prompts + [prompts[2][:16] + [5, 6]]  # shares two 8-blocks / four 4-blocks with #2


def _greedy(**options):
    return SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, **options)


def _assert_no_leaks(engine: LLMEngine):
    assert not engine.has_unfinished_requests() and not engine.requests
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert all(b.ref_count == 0 for b in engine.blocks.blocks)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = FAMILIES[request.param]().eval()
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)
    refs = []
    with torch.no_grad():
        for prompt in _prompts():
            if request.param == "llama-dynamic-rope":  # HF keeps its longest table across calls
                hf = type(hf).from_pretrained(directory).eval()
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                              max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
            refs.append(out[0, len(prompt):].tolist())
    return load_model(directory), refs


@pytest.mark.hf_parity
def test_greedy_batch_on_prepacked_weights_equals_hf_generate(family):
    """Every linear on its prepacked weight (whichever layout this machine's timing chose for
    the engines of the other tests)."""
    import copy

    from mlx_core import prepack_linear_weights

    model, refs = family
    model = copy.deepcopy(model)  # a copy's packed weights (if any) repack on first use
    prepack_linear_weights(model, calibrate=False)
    # experts run stacked; a router keeps its own class (DeepSeek-V3's bias) and is not packed
    assert all(m.packed_weight is not None for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".experts." not in name
               and type(m) is not Router)
    llm = LLM(model, num_blocks=64, block_size=4)
    outs = llm.generate([{"prompt_token_ids": p} for p in _prompts()], _greedy())
    assert [o.outputs[0].token_ids for o in outs] == refs
    _assert_no_leaks(llm.engine)


@pytest.mark.hf_parity
@pytest.mark.parametrize("mode", sorted(MODES))
def test_greedy_batch_equals_hf_generate_one_by_one(family, mode):
    model, refs = family
    llm = LLM(model, **MODES[mode])
    outs = llm.generate([{"prompt_token_ids": p} for p in _prompts()], _greedy())
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    # again, now that the first run's blocks are cached (prompts of one step cannot share yet)
    again = llm.generate([{"prompt_token_ids": p} for p in _prompts()], _greedy())
    assert [o.outputs[0].token_ids for o in again] == refs
    stats = llm.engine.stats()
    if "preemption" in mode:
        assert stats.num_preemptions > 0
    if "speculative" in mode:  # drafts were made, and some kept (the tokens equal HF's anyway)
        assert 0 < stats.num_accepted_tokens <= stats.num_draft_tokens
    assert (stats.prefix_cache_hit_rate > 0) == (mode != "no-prefix-caching")
    _assert_no_leaks(llm.engine)


@pytest.mark.hf_parity
def test_a_prefix_shared_to_the_middle_of_a_block_is_reused_token_by_token(family):
    model, _ = family
    g = torch.Generator().manual_seed(5)
    tokens = (torch.randperm(125, generator=g) + 3).tolist()  # distinct: no chance matches
    system = tokens[:21]  # 5 blocks of 4, and 1 token of the sixth
    turns = [system + tokens[21:26], system + tokens[26:28], system + tokens[28:35]]
    plain = LLM(model, block_size=4, enable_prefix_caching=False)  # held to HF above
    expected = [o.outputs[0].token_ids
                for o in plain.generate([{"prompt_token_ids": p} for p in turns], _greedy())]
    llm = LLM(model, block_size=4)
    outs = [llm.generate({"prompt_token_ids": turn}, _greedy())[0] for turn in turns]
    assert [o.outputs[0].token_ids for o in outs] == expected
    # dynamic NTK: a prompt past max_position_embeddings (24) has its own length's table, so
    # these turns (23 to 43 tokens, of different lengths) share nothing
    dynamic = model.config.rope_scaling and model.config.rope_scaling["rope_type"] == "dynamic"
    # later turns: the 5 whole blocks shared, the sixth's first token copied from the first turn
    assert [o.metrics.num_cached_tokens for o in outs] == ([0, 0, 0] if dynamic else [0, 21, 21])
    # a chat's next turn: all the last turn computed is reused, its partly filled block included
    follow_up = turns[2] + outs[2].outputs[0].token_ids + tokens[35:38]
    out = llm.generate({"prompt_token_ids": follow_up}, _greedy())[0]
    assert out.outputs[0].token_ids == plain.generate({"prompt_token_ids": follow_up},
                                                      _greedy())[0].outputs[0].token_ids
    assert out.metrics.num_cached_tokens == (0 if dynamic else len(turns[2]) + NEW_TOKENS - 1)
    _assert_no_leaks(llm.engine)


@pytest.mark.hf_parity
@pytest.mark.parametrize("family", ["llama-dynamic-rope", "phi3-longrope"], indirect=True)
def test_prefix_cache_shares_blocks_only_under_one_rope_table(family):
    """A long prompt's keys are not a short one's (another table): a short prompt that starts
    like a long one computes its own, and a long one of the same table shares."""
    model, _ = family
    tokens = (torch.randperm(125, generator=torch.Generator().manual_seed(11)) + 3).tolist()
    prompts = [tokens[:28], tokens[:12], tokens[:20] + tokens[40:48]]  # long, short, long
    plain = LLM(model, block_size=4, enable_prefix_caching=False)  # held to HF above
    expected = [o.outputs[0].token_ids
                for o in plain.generate([{"prompt_token_ids": p} for p in prompts], _greedy())]
    llm = LLM(model, block_size=4)
    outs = [llm.generate({"prompt_token_ids": p}, _greedy())[0] for p in prompts]
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert [o.metrics.num_cached_tokens for o in outs] == [0, 0, 20]
    _assert_no_leaks(llm.engine)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tokenizer):
    """A tiny llama with the word-level tokenizer (ids 0..10 are named words, 2 is the eos)."""
    from mlx_core import build_model, get_preset, load_tokenizer, save_model

    torch.manual_seed(0)
    model = build_model(get_preset("tiny-llama"))
    model.reset_parameters(std=0.2)  # peaked distributions: greedy text is not all one token
    directory = save_model(model, tmp_path_factory.mktemp("tiny") / "m", tokenizer=tiny_tokenizer)
    return LLM(directory, num_blocks=64, block_size=4), load_tokenizer(directory)


def test_text_prompts_stop_strings_and_stop_tokens(tiny):
    llm, tok = tiny
    prompt = "hello there w5 w9 w17"
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    completion = free.outputs[0]
    assert free.prompt == prompt and free.prompt_token_ids == tok.encode(prompt)
    assert completion.text == tok.decode(completion.token_ids)
    words = completion.text.split()
    stop = words[3]
    cut = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10, stop=[stop, "nope"],
                                              ignore_eos=True))[0].outputs[0]
    first = completion.text.index(stop)
    assert cut.text == completion.text[:first] and cut.finish_reason == "stop"
    assert cut.stop_reason == stop
    kept = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10, stop=stop,
                                               include_stop_str_in_output=True,
                                               ignore_eos=True))[0].outputs[0]
    assert kept.text == completion.text[:first + len(stop)]
    token = completion.token_ids[4]
    by_id = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[token],
                                                ignore_eos=True))[0].outputs[0]
    at = completion.token_ids.index(token)
    assert by_id.token_ids == completion.token_ids[:at + 1] and by_id.stop_reason == token
    _assert_no_leaks(llm.engine)


def test_eos_ends_a_completion_unless_ignored_or_before_min_tokens(tiny):
    llm, _ = tiny
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    completion = llm.generate("hi", params)[0].outputs[0]
    eos = completion.token_ids[2]  # make the 3rd greedy token this engine's end of sequence
    llm.engine.eos_token_ids.append(eos)
    try:
        stopped = llm.generate("hi", SamplingParams(temperature=0, max_tokens=10))[0].outputs[0]
        ignored = llm.generate("hi", params)[0].outputs[0]
        held = llm.generate("hi", SamplingParams(temperature=0, max_tokens=10, min_tokens=5))
    finally:
        llm.engine.eos_token_ids.remove(eos)
    first = completion.token_ids.index(eos)
    assert stopped.token_ids == completion.token_ids[:first + 1] and stopped.finish_reason == "stop"
    assert stopped.stop_reason is None  # eos, not a requested stop
    assert ignored.token_ids == completion.token_ids
    assert len(held[0].outputs[0].token_ids) >= 5


def test_n_completions_and_seeds_are_reproducible_in_any_batch(tiny):
    llm, _ = tiny
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
    alone = llm.generate("hello there", params)[0]
    assert [c.index for c in alone.outputs] == [0, 1, 2]
    texts = [c.token_ids for c in alone.outputs]
    assert len({tuple(t) for t in texts}) > 1  # the n samples differ
    crowd = llm.generate(["w3 w4", "hello there", "be brief"],
                         [SamplingParams(temperature=1.0, max_tokens=8), params,
                          SamplingParams(temperature=0.8, max_tokens=5)])
    assert [c.token_ids for c in crowd[1].outputs] == texts
    _assert_no_leaks(llm.engine)


def test_n_choices_compute_their_shared_prompt_once(tiny):
    """The other choices of an n > 1 request wait for the first one's prompt, then take its
    full prompt blocks from the prefix cache instead of computing them again."""
    llm, _ = tiny
    llm.reset_prefix_cache()
    prompt = list(range(11, 53))  # 42 tokens: 10 full blocks of 4
    request_id = llm.engine.add_request(prompt, SamplingParams(n=4, temperature=1.0, seed=5,
                                                               max_tokens=4, ignore_eos=True))
    sequences = llm.engine.requests[request_id].sequences
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert sequences[0].num_cached_tokens == 0
    assert all(s.num_cached_tokens >= 40 for s in sequences[1:])
    _assert_no_leaks(llm.engine)


def test_logprobs_equal_the_full_forward(tiny):
    llm, _ = tiny
    model = llm.engine.model
    out = llm.generate("w7 w8 w9", SamplingParams(temperature=0, max_tokens=6, logprobs=2,
                                                  ignore_eos=True))[0]
    completion = out.outputs[0]
    ids = torch.tensor([out.prompt_token_ids + completion.token_ids])
    with torch.no_grad():
        ref = torch.log_softmax(model(ids)[0, len(out.prompt_token_ids) - 1:-1], dim=-1)
    for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs,
                                              strict=True)):
        assert entry[token] == pytest.approx(float(ref[step, token]), abs=1e-5)
        assert len(entry) in (2, 3)  # the chosen token plus the top 2 (it may be one of them)
    assert completion.cumulative_logprob == pytest.approx(
        sum(e[t] for t, e in zip(completion.token_ids, completion.logprobs, strict=True)))


def test_abort_frees_everything_mid_run(tiny):
    llm, _ = tiny
    engine = llm.engine
    a = engine.add_request("hello there", SamplingParams(max_tokens=50, ignore_eos=True))
    b = engine.add_request("w3 w4 w5", SamplingParams(max_tokens=3, ignore_eos=True))
    for _ in range(2):
        engine.step()
    assert engine.blocks.num_free_blocks < engine.blocks.num_blocks
    engine.abort_request(a)
    finished = {}
    while engine.has_unfinished_requests() or engine.requests:
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].finish_reason
    assert finished == {a: "abort", b: "length"}
    _assert_no_leaks(engine)


def test_bad_requests_and_options_fail_clearly(tiny):
    llm, _ = tiny
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([[]])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 128\)"):
        llm.generate([[5, 900]])
    for stop in (128, -1, 2**63):  # once crashed the step loop (with min_tokens)
        with pytest.raises(ValueError, match=r"stop_token_ids must be in \[0, 128\)"):
            llm.generate([[5, 6]], SamplingParams(stop_token_ids=[stop], min_tokens=2))
    with pytest.raises(ValueError, match="at most 256"):
        llm.generate([[5] * 300])
    small = LLMEngine(llm.engine.model, llm.get_tokenizer(), EngineConfig(num_blocks=8, block_size=4))
    with pytest.raises(ValueError, match="needs up to 26 KV blocks but the cache has only 8"):
        small.add_request("hi", SamplingParams(max_tokens=100))
    with pytest.raises(TypeError, match="unknown LLM options"):
        LLM(llm.engine.model, tokenizer=llm.get_tokenizer(), kv_cache_gb=2)
    with pytest.raises(ValueError, match="2GiB"):
        parse_memory("two gigs")
    assert parse_memory("1.5GiB") == int(1.5 * 2**30) and parse_memory("512MB") == 512 * 10**6
    _assert_no_leaks(llm.engine)


def test_multi_head_latent_attention_caches_its_latent(tiny, tmp_path):
    """DeepSeek's paged cache holds one latent + rope entry per token and layer, keys and
    values at once (the absorbed form; its greedy parity with HF is in the family tests)."""
    from mlx_adapters import LoraConfig, get_peft_model
    from mlx_core import build_model, get_preset
    from mlx_serve.model_runner import kv_bytes_per_block

    torch.manual_seed(0)
    model = build_model(get_preset("tiny-deepseek-v3")).eval()
    config = model.config
    llm = LLM(model, tokenizer=tiny[1], num_blocks=16, block_size=4)
    cache = llm.engine.runner.cache
    width = config.kv_lora_rank + config.qk_rope_head_dim  # 16 + 8
    assert cache.keys.shape == (config.num_layers, 16, 4, 1, width) and cache.values is cache.keys
    assert kv_bytes_per_block(config, 4, torch.float32) == config.num_layers * 4 * width * 4
    # against per-head keys and values: 4 heads x (24 + 12) numbers per token, 6x the latent's
    assert config.num_heads * (config.qk_head_dim + config.v_head_dim) == 6 * width
    outs = llm.generate([[5, 6, 7, 8, 9], [5, 6, 7, 1]], _greedy())
    assert all(len(o.outputs[0].token_ids) == NEW_TOKENS for o in outs)
    peft_model = get_peft_model(build_model(get_preset("tiny-deepseek-v3")), LoraConfig(
        r=4, target_modules=["kv_b_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="kv_b_proj.*merge it"):
        llm.engine.add_lora("a", tmp_path / "adapter")
    _assert_no_leaks(llm.engine)


def test_linear_weights_are_prepacked_for_cpu_fp32_only(tiny):
    """On CPU in fp32 the engine runs every linear on a prepacked weight (the greedy HF parity
    tests above run through it); elsewhere, or with prepack_weights=False, nothing is packed."""
    from mlx_core import build_model, get_preset

    llm, _ = tiny
    linears = [m for m in llm.engine.model.modules() if isinstance(m, torch.nn.Linear)]
    packed = [m for m in linears if getattr(m, "packed_weight", None) is not None]  # won here
    assert llm.engine.runner.packed_bytes == sum(m.weight.numel() * 4 for m in packed)
    for model, options in ((build_model(get_preset("tiny-llama")), dict(prepack_weights=False)),
                           (build_model(get_preset("tiny-llama")).to(torch.bfloat16), {})):
        engine = LLMEngine(model, llm.get_tokenizer(), EngineConfig(num_blocks=8, **options))
        assert engine.runner.packed_bytes == 0
        assert all(getattr(m, "packed_weight", None) is None for m in model.modules())


def test_cache_size_comes_from_the_memory_budget(tiny):
    llm, _ = tiny
    model = llm.engine.model
    engine = LLMEngine(model, llm.get_tokenizer(), EngineConfig(kv_cache_memory="1MiB", block_size=4))
    per_block = 2 * 2 * 4 * 2 * 16 * 4  # k+v, layers, block, kv heads, head dim, fp32
    assert engine.blocks.num_blocks == 2**20 // per_block
    assert engine.runner.cache.keys.shape[1] == engine.blocks.num_blocks
