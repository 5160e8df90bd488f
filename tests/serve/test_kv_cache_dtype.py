"""``EngineConfig.kv_cache_dtype``: an fp16 or bf16 KV cache under an fp32 model on CPU holds twice
the blocks in the same memory, and its outputs stay those of the fp32 cache within the half
type's rounding of keys and values (attention still computes in fp32)."""

import pytest
import torch

from mlx_core import load_model
from mlx_serve import LLM, SamplingParams
from mlx_serve.config import EngineConfig
from mlx_serve.model_runner import kv_bytes_per_block

from .test_engine import FAMILIES

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("llama")
    FAMILIES["llama"]().save_pretrained(directory)
    return directory


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in (9, 30, 21, 5)]


def _run(model_dir, kv_cache_dtype, params):
    # chunks of 8 tokens: later chunks of the 21- and 30-token prompts read their cached prefix
    # back from the cache (the native varlen path), decodes read it through paged decode
    llm = LLM(load_model(model_dir), kv_cache_dtype=kv_cache_dtype, max_num_batched_tokens=8,
              block_size=4, num_blocks=64)
    outs = llm.generate([{"prompt_token_ids": p} for p in _prompts()], params)
    blocks = llm.engine.blocks
    assert blocks.num_free_blocks == blocks.num_blocks  # nothing leaked
    return llm, outs


def test_fp16_cache_gives_the_fp32_caches_greedy_tokens_and_close_logprobs(model_dir):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    _, want = _run(model_dir, "auto", params)
    llm, got = _run(model_dir, "fp16", params)
    assert llm.engine.config.kv_cache_dtype == "float16"
    assert llm.engine.runner.cache.keys.dtype == torch.float16
    for g, w in zip(got, want, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for token, g_step, w_step in zip(w.outputs[0].token_ids, g.outputs[0].logprobs,
                                         w.outputs[0].logprobs, strict=True):
            # fp16 keeps 11 significant bits of each key and value
            assert g_step[token] == pytest.approx(w_step[token], abs=2e-3)


@pytest.mark.parametrize("kv_cache_dtype", ["float16", "bfloat16"])
def test_half_caches_prompt_logprobs_stay_close_to_the_fp32_caches(model_dir, kv_cache_dtype):
    """Teacher-forced (the prompt's own tokens), so bf16's coarser rounding cannot change the
    path: each prompt position's log-probability against the fp32 cache's."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    _, want = _run(model_dir, "auto", params)
    _, got = _run(model_dir, kv_cache_dtype, params)
    tolerance = {"float16": 2e-3, "bfloat16": 2e-2}[kv_cache_dtype]  # 11 and 8 significant bits
    for g, w in zip(got, want, strict=True):
        for p in range(1, len(w.prompt_token_ids)):
            token = w.prompt_token_ids[p]
            assert g.prompt_logprobs[p][token] == pytest.approx(w.prompt_logprobs[p][token],
                                                                abs=tolerance)


def test_a_half_cache_holds_twice_the_blocks_in_the_same_memory(model_dir):
    model = load_model(model_dir)
    per_block = kv_bytes_per_block(model.config, 4, torch.float32)
    sizes = {}
    for name in ("auto", "bf16"):
        llm = LLM(model, kv_cache_dtype=name, block_size=4, kv_cache_memory=40 * per_block)
        sizes[name] = llm.engine.blocks.num_blocks
    assert sizes == {"auto": 40, "bf16": 80}


def test_bad_kv_cache_dtypes_are_named_before_any_work(model_dir):
    with pytest.raises(ValueError, match="unknown kv_cache_dtype 'fp8'.*float16"):
        EngineConfig(kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="under an fp32 model on CPU only"):
        LLM(load_model(model_dir), dtype="bfloat16", kv_cache_dtype="float16")
    # the model's own type is always fine
    assert EngineConfig(kv_cache_dtype="bf16").cache_dtype(torch.bfloat16, torch.device("cpu")) \
        == torch.bfloat16
