"""The fixed-shape decode step (``mlx_core.models.decode_step``): eager, it gives the logits of
the eager forward over a growing cache (fp32: 1e-5) for every family (RoPE and learned
positions, a sliding window, biases, tied heads, mixtures of experts, left-padded batches);
compiled whole (``fullgraph=True``), ``generate(compile=True)`` gives the tokens of eager
generation, on fp32 and quantized models (mixtures of experts included), and one compiled graph
serves every prompt of a cache length."""

import dataclasses

import pytest
import torch

from mlx_core import build_model, generate, get_preset
from mlx_core.models import decode_step
from mlx_core.models.decode_step import DecodeStep, compiled_cache_length
from mlx_core.transforms import quantize

DENSE = ["tiny-llama", "tiny-mistral", "tiny-gpt2", "tiny-qwen2", "tiny-qwen3", "tiny-olmo2", "tiny-llama3", "tiny-gemma3", "tiny-gemma2",
         "tiny-llama-dynamic-rope", "tiny-phi3-longrope"]  # RoPE tables switching at 16 tokens
MOE = ["tiny-mixtral", "tiny-qwen3-moe", "tiny-deepseek-v2", "tiny-deepseek-v3"]


def _model(preset):
    torch.manual_seed(0)
    return build_model(get_preset(preset)).eval()


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in (7, 3, 12)]


@pytest.mark.parametrize("preset", DENSE + MOE)
@torch.inference_mode()
def test_step_gives_the_eager_forwards_logits(preset):
    model = _model(preset)
    prompts = _prompts()
    longest, steps = max(map(len, prompts)), 10  # past tiny-mistral's window of 8
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p):], mask[row, longest - len(p):] = torch.tensor(p), 1
    eager, fixed = model.new_cache(3, longest + steps), model.new_cache(3, longest + steps + 5)
    token = model(ids, attention_mask=mask, kv_cache=eager, logits_to_keep=1)[:, -1].argmax(-1)
    model(ids, attention_mask=mask, kv_cache=fixed, logits_to_keep=1)
    step = DecodeStep(model, fixed)
    positions, slot = fixed.key_valid.sum(-1), torch.tensor([fixed.length])
    for _ in range(steps):
        want = model(token[:, None], kv_cache=eager)[:, -1]
        got = step(token, positions, slot)
        fixed.advance(1), positions.add_(1), slot.add_(1)
        assert (got - want).abs().max() < 1e-5
        token = want.argmax(-1)


def test_step_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="zoo's Transformer"):
        DecodeStep(torch.nn.Linear(2, 2))


def test_cache_lengths_round_up_to_the_step():
    assert [compiled_cache_length(n) for n in (1, 128, 129, 300)] == [128, 128, 256, 384]


@pytest.mark.slow
@pytest.mark.parametrize("scheme", [None, "int4", "int8", "w8a8"])
def test_compiled_generation_equals_eager(scheme):
    model = _model("tiny-llama")
    if scheme is not None:
        quantize(model, scheme)
    prompts = _prompts()
    eager = generate(model, prompts, max_new_tokens=12, stop_token_ids=[])
    assert generate(model, prompts, max_new_tokens=12, stop_token_ids=[], compile=True) == eager
    # other prompts of the same batch size and cache length: the same compiled graph, no recompile
    compiled = decode_step._COMPILED[model]
    again = [p[:-2] for p in prompts]
    assert (generate(model, again, max_new_tokens=12, stop_token_ids=[], compile=True)
            == generate(model, again, max_new_tokens=12, stop_token_ids=[]))
    assert decode_step._COMPILED[model] is compiled and len(compiled) == 1


@pytest.mark.slow
def test_compiled_step_sees_new_weight_values_and_recompiles_for_new_modules():
    """The compiled step reads the weights afresh: new values in place are used; quantizing the
    model in place (new modules) compiles anew rather than running the old graph."""
    model = _model("tiny-llama")
    prompts = _prompts()
    generate(model, prompts, max_new_tokens=4, stop_token_ids=[], compile=True)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(-3.0)
    assert (generate(model, prompts, max_new_tokens=8, stop_token_ids=[], compile=True)
            == generate(model, prompts, max_new_tokens=8, stop_token_ids=[]))
    quantize(model, "int8")
    assert (generate(model, prompts, max_new_tokens=8, stop_token_ids=[], compile=True)
            == generate(model, prompts, max_new_tokens=8, stop_token_ids=[]))


@pytest.mark.slow
def test_models_of_one_structure_but_other_shapes_each_get_their_graph():
    """All models share DecodeStep's code, so dynamo tells their graphs apart by its guards on
    the weights' shapes: two models alike but for a weight's shape (here the MLP's width; in
    practice a per-channel against a per-group int8 head) each decode as they do eagerly.
    Dropping those guards (a guard_filter_fn) ran one model's graph on the other's weights."""
    first = _model("tiny-llama")
    config = get_preset("tiny-llama")
    torch.manual_seed(1)
    second = build_model(dataclasses.replace(config, intermediate_size=config.intermediate_size * 2)).eval()
    prompts = _prompts()
    for model in (first, second):
        assert (generate(model, prompts, max_new_tokens=6, stop_token_ids=[], compile=True)
                == generate(model, prompts, max_new_tokens=6, stop_token_ids=[]))


@pytest.mark.slow
@pytest.mark.parametrize("preset,scheme", [("tiny-mixtral", None), ("tiny-qwen3-moe", None),
                                           ("tiny-deepseek-v3", None),
                                           ("tiny-mixtral", "int8")])
def test_compiled_moe_generation_equals_eager(preset, scheme):
    """Routing, the sort by expert and the grouped expert matmuls compile whole
    (``fullgraph=True``: no host sync, no data-dependent shape); quantized experts, which run one
    by one, compile in their shape-static form."""
    model = _model(preset)
    if scheme is not None:
        quantize(model, scheme)
    prompts = _prompts()
    eager = generate(model, prompts, max_new_tokens=12, stop_token_ids=[])
    assert generate(model, prompts, max_new_tokens=12, stop_token_ids=[], compile=True) == eager


@pytest.mark.slow
def test_cli_generate_compile_prints_the_eager_text(tiny_model_dir):
    from typer.testing import CliRunner

    from mlx_core.cli.app import build_app

    runner = CliRunner()
    args = ["generate", "-m", str(tiny_model_dir), "-p", "hello there", "-n", "6", "--no-chat",
            "-q", "int4"]
    eager = runner.invoke(build_app(), args)
    compiled = runner.invoke(build_app(), [*args, "--compile"])
    assert eager.exit_code == 0 and compiled.exit_code == 0, compiled.output
    assert compiled.output == eager.output
    jax = runner.invoke(build_app(), ["generate", "-m", str(tiny_model_dir), "-p", "hi",
                                      "--backend", "jax", "--compile"])
    assert jax.exit_code == 1 and "drop --compile" in jax.output
