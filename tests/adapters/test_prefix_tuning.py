"""Prefix tuning against HF PEFT: cross-loading both ways (1e-5, fp32) on HF and zoo models, with
and without the reparameterising MLP; gradients equal PEFT's and reach only the prefix; the
token ids of HF generate equal PEFT's (exact)."""

import pytest
import torch
import transformers
from peft import PeftModel as HFPeftModel
from peft import PrefixTuningConfig as HFPrefixTuningConfig
from peft import get_peft_model as hf_get_peft_model

from mlx_adapters import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model
from mlx_core import load_model

from .helpers import (
    assert_prompt_generate_refusals,
    hf_peft_generate,
    left_padded_batch,
    save_tiny_llama,
    train_losses,
)

pytestmark = pytest.mark.hf_parity

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
MASK = torch.ones_like(IDS)
MASK[1, 6:] = 0  # right padding: the real tokens keep their positions on both sides


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("prefix") / "base")


def _hf(directory):
    return transformers.LlamaForCausalLM.from_pretrained(directory).eval()


def _logits(model, mask=None, ids=IDS):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out


def _close(got, want, mask=None):
    if mask is not None:
        got, want = got[mask.bool()], want[mask.bool()]
    return (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("projection", [False, True])
def test_cross_loads_with_hf_peft(hf_dir, tmp_path, projection):
    torch.manual_seed(1)
    theirs = hf_get_peft_model(_hf(hf_dir), HFPrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=projection)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    base_logits = _logits(_hf(hf_dir))
    for base in (_hf(hf_dir), load_model(hf_dir)):  # an HF model and the zoo model
        ours = PeftModel.from_pretrained(base, tmp_path / "theirs").eval()
        got = _logits(ours)
        assert got.shape == (2, 9, 128)  # no virtual tokens in the output
        assert (got - base_logits).abs().max() > 1e-3  # the prefix does something
        assert _close(got, _logits(theirs))
        assert _close(_logits(ours, MASK), _logits(theirs, MASK), MASK)

    torch.manual_seed(2)
    mine = get_peft_model(load_model(hf_dir), PrefixTuningConfig(
        num_virtual_tokens=4, prefix_projection=projection, encoder_hidden_size=24)).eval()
    mine.save_pretrained(tmp_path / "mine")
    loaded = HFPeftModel.from_pretrained(_hf(hf_dir), tmp_path / "mine").eval()
    assert loaded.peft_config["default"].token_dim == 32  # 2 key/value heads x 16 (GQA)
    assert _close(_logits(loaded), _logits(mine))
    assert _close(_logits(loaded, MASK), _logits(mine, MASK), MASK)


@pytest.mark.parametrize("projection", [False, True])
def test_training_gradients_equal_peft_and_reach_only_the_prefix(hf_dir, projection):
    torch.manual_seed(3)
    theirs = hf_get_peft_model(_hf(hf_dir), HFPrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=projection))
    names = {n for n, p in theirs.named_parameters() if p.requires_grad}
    theirs(input_ids=IDS, attention_mask=MASK, labels=IDS.masked_fill(MASK == 0, -100)).loss.backward()
    for base in (_hf(hf_dir), load_model(hf_dir)):
        ours = get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=projection))
        assert {n for n, p in ours.named_parameters() if p.requires_grad} == names
        ours.prompt_encoder.load_state_dict(theirs.prompt_encoder.state_dict())
        out = ours(input_ids=IDS, attention_mask=MASK, labels=IDS.masked_fill(MASK == 0, -100))
        (out.loss if hasattr(out, "loss") else out).backward()
        params = dict(ours.named_parameters())
        for name in names:
            want = dict(theirs.named_parameters())[name].grad
            assert (params[name].grad - want).abs().max() < 1e-5 * max(1.0, want.abs().max()), name
        assert all(p.grad is None for n, p in params.items() if n not in names)


def test_zoo_training_with_checkpointing_and_incremental_decoding(hf_dir):
    model = get_peft_model(load_model(hf_dir), PrefixTuningConfig(num_virtual_tokens=4,
                                                                  prefix_projection=True))
    losses = train_losses(model, IDS, steps=8, lr=1e-2)
    assert losses[-1] < losses[0]
    grads = {}
    for checkpointing in (False, True):  # a recomputed layer sees the same prefix
        model.base_model.model.gradient_checkpointing_enable(checkpointing)
        model.train()
        model(IDS, labels=IDS).backward()
        grads[checkpointing] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads.values(), strict=True))
    model.eval()
    full = _logits(model)
    cache = model.new_cache(batch_size=2)
    with torch.no_grad():
        steps = [model(IDS[:, :5], kv_cache=cache)]
        steps += [model(IDS[:, i:i + 1], kv_cache=cache) for i in range(5, 9)]
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5
    with model.disable_adapter():
        assert torch.equal(_logits(model), _logits(load_model(hf_dir)))


def test_registry_and_bad_input(hf_dir, tmp_path):
    from typer.testing import CliRunner

    from mlx_core.cli.app import build_app

    assert "prefix_tuning" in CliRunner().invoke(build_app(), ["adapters", "methods"]).output
    model = get_peft_model(load_model(hf_dir), PrefixTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="cannot share one model"):
        model.add_adapter("lora", LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="num_virtual_tokens must be positive"):
        PrefixTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="init_weights"):
        PrefixTuningConfig(init_weights="ones")
    zero = get_peft_model(load_model(hf_dir), PrefixTuningConfig(num_virtual_tokens=2, init_weights="zero"))
    assert not zero.prompt_encoder["default"].embedding.weight.any()
    model.save_pretrained(tmp_path / "two-layers")
    bigger = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="num_layers=2, but the model needs 3"):
        PeftModel.from_pretrained(bigger, tmp_path / "two-layers")
    hf = _hf(hf_dir)
    hf.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        get_peft_model(hf, PrefixTuningConfig(num_virtual_tokens=2))


def test_gpt2_with_learned_positions(tmp_path):
    """No GQA, learned positions: the prefix shifts the input's positions on both sides alike."""
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)).save_pretrained(tmp_path / "gpt2")
    torch.manual_seed(1)
    theirs = hf_get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval(),
                               HFPrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    assert theirs.peft_config["default"].token_dim == 64
    ours = PeftModel.from_pretrained(load_model(tmp_path / "gpt2"), tmp_path / "adapter").eval()
    assert _close(_logits(ours), _logits(theirs))

@pytest.mark.parametrize("projection", [False, True])
def test_generate_equals_peft_generate(hf_dir, tmp_path, projection):
    """HF generate with a prefix-tuning adapter (the prefix as the first step's cache, the mask
    extended and the positions moved past the prefix at every step): greedy and sampled (one
    torch seed) token ids equal HF PEFT's exactly, for a left-padded batch of two prompts, with
    the adapter loaded from PEFT's files (the flat prefix) and with the MLP running
    (``prefix_projection``), with and without a cache; inside ``disable_adapter()`` the base
    model's own."""
    torch.manual_seed(1)
    theirs = hf_get_peft_model(_hf(hf_dir), HFPrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=projection)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = PeftModel.from_pretrained(_hf(hf_dir), tmp_path / "theirs").eval()
    live = get_peft_model(_hf(hf_dir), PrefixTuningConfig(num_virtual_tokens=5,
                                                          prefix_projection=projection)).eval()
    live.prompt_encoder.load_state_dict(theirs.prompt_encoder.state_dict())
    ids, mask = left_padded_batch()
    greedy = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0, do_sample=False)
    for options in (greedy, {**greedy, "do_sample": True, "top_k": 0, "temperature": 2.0}):
        torch.manual_seed(7)
        want = hf_peft_generate(theirs, **options)
        for ours, use_cache in ((loaded, True), (loaded, False), (live, True)):
            torch.manual_seed(7)
            assert torch.equal(ours.generate(**options, use_cache=use_cache), want)
    got = loaded.generate(**greedy)
    assert got.shape == (2, 7 + 10) and torch.equal(got[:, :7], ids)
    plain = _hf(hf_dir).generate(**greedy)
    assert not torch.equal(got, plain)  # the prefix changes the tokens
    with loaded.disable_adapter():
        assert torch.equal(loaded.generate(**greedy), plain)


def test_generate_bad_input_names_the_fix(hf_dir):
    ours = get_peft_model(_hf(hf_dir), PrefixTuningConfig(num_virtual_tokens=3)).eval()
    zoo = get_peft_model(load_model(hf_dir), PrefixTuningConfig(num_virtual_tokens=3))
    assert_prompt_generate_refusals(ours, zoo, "no HF generate .*peft_model.new_cache")


GEMMA = {"gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config),
         "gemma3_text": (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig)}


@pytest.fixture(scope="module", params=list(GEMMA))
def gemma(request, tmp_path_factory):
    """A loader of a tiny random Gemma 2 / Gemma 3 (text): layers sliding / full /
    sliding with a window of 4 (shorter than the prefix plus the input, so it matters), head_dim
    16 where hidden / heads is 8, 2 key/value heads (GQA), query_pre_attn_scalar 24."""
    model_class, config_class = GEMMA[request.param]
    torch.manual_seed(0)
    config = config_class(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          query_pre_attn_scalar=24, sliding_window=4, pad_token_id=0,
                          eos_token_id=None, layer_types=["sliding_attention", "full_attention",
                                                          "sliding_attention"])
    path = tmp_path_factory.mktemp(request.param) / "base"
    model_class(config).save_pretrained(path)
    return lambda: model_class.from_pretrained(path).eval()


def _cache_layout(cache):
    """Per layer: the cache layer's kind and how many positions it holds."""
    return [(type(layer).__name__, layer.keys.shape[-2]) for layer in cache.layers]


def test_gemma_logits_loss_and_gradients_equal_peft(gemma, tmp_path):
    """Gemma 2 / Gemma 3 (text), which PEFT special-cases: their prefix cache is laid out by the
    model's config, so the sliding-window layers keep only the last ``sliding_window - 1``
    positions, as the model's own cache does. Against HF PEFT (fp32): logits (with and without a
    right-padded attention mask) within 1e-5 with PEFT's adapter (with ``prefix_projection``,
    saved as the flat prefix) loaded here and ours loaded into PEFT; the loss with labels and the
    gradients of the prefix MLP within 1e-5 (relative to the largest); the forward's cache holds
    as many positions per layer, of the same kind, as PEFT's."""
    load = gemma
    torch.manual_seed(1)
    theirs = hf_get_peft_model(load(), HFPrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=True))
    config = theirs.peft_config["default"]
    assert (config.token_dim, config.num_attention_heads) == (32, 2)  # 2 key/value heads x head_dim 16
    theirs.eval().save_pretrained(tmp_path / "theirs")
    ours = PeftModel.from_pretrained(load(), tmp_path / "theirs").eval()
    assert (_logits(ours) - _logits(load())).abs().max() > 1e-3  # the prefix does something
    assert _close(_logits(ours), _logits(theirs))
    assert _close(_logits(ours, MASK), _logits(theirs, MASK), MASK)
    with torch.no_grad():
        ours_cache = ours(input_ids=IDS, attention_mask=MASK, use_cache=True).cache
        theirs_cache = theirs(input_ids=IDS, attention_mask=MASK, use_cache=True).past_key_values
    assert _cache_layout(ours_cache) == _cache_layout(theirs_cache)
    assert [length for _, length in _cache_layout(ours_cache)] == [3, 5 + 9, 3]

    live = get_peft_model(load(), PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=True))
    live.prompt_encoder.load_state_dict(theirs.prompt_encoder.state_dict())
    labels = IDS.masked_fill(MASK == 0, -100)
    want = theirs.train()(input_ids=IDS, attention_mask=MASK, labels=labels).loss
    got = live.train()(input_ids=IDS, attention_mask=MASK, labels=labels).loss
    assert (got - want).abs() < 1e-5
    want.backward()
    got.backward()
    trained = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    params = dict(live.named_parameters())
    assert {n for n, p in params.items() if p.requires_grad} == set(trained)
    for name, reference in trained.items():
        assert (params[name].grad - reference).abs().max() < 1e-5 * max(1.0, reference.abs().max()), name
    assert all(p.grad is None for n, p in params.items() if n not in trained)

    live.eval().save_pretrained(tmp_path / "ours")
    loaded = HFPeftModel.from_pretrained(load(), tmp_path / "ours").eval()
    assert _close(_logits(loaded), _logits(live))
    assert _close(_logits(loaded, MASK), _logits(live, MASK), MASK)


def test_gemma_generate_equals_peft_generate(gemma, tmp_path):
    """Greedy HF generate on Gemma 2 / Gemma 3 (text), a left-padded batch of two prompts, 8 new
    tokens: the token ids equal HF PEFT's exactly, with and without a cache, and the final cache
    is laid out as PEFT's (the sliding-window layers bounded). PEFT 0.21's own ``generate`` loses
    the prefix under transformers 5 (the cache-name bug, ``hf_peft_generate``'s docstring), so
    PEFT is run through that helper, which changes only the cache's name."""
    load = gemma
    torch.manual_seed(1)
    theirs = hf_get_peft_model(load(), HFPrefixTuningConfig(task_type="CAUSAL_LM",
                                                            num_virtual_tokens=5)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    ours = PeftModel.from_pretrained(load(), tmp_path / "theirs").eval()
    ids, mask = left_padded_batch()
    greedy = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0,
                  do_sample=False, return_dict_in_generate=True)
    want = hf_peft_generate(theirs, **greedy)
    got = ours.generate(**greedy)
    assert torch.equal(got.sequences, want.sequences)
    assert _cache_layout(got.cache) == _cache_layout(want.cache)
    assert torch.equal(ours.generate(**greedy, use_cache=False).sequences, want.sequences)
    plain = load().generate(**greedy).sequences
    assert not torch.equal(got.sequences, plain)  # the prefix changes the tokens
    with ours.disable_adapter():
        assert torch.equal(ours.generate(**greedy).sequences, plain)
