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

from .helpers import hf_peft_generate, left_padded_batch, save_tiny_llama, train_losses

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
    ids, mask = left_padded_batch()
    ours = get_peft_model(_hf(hf_dir), PrefixTuningConfig(num_virtual_tokens=3)).eval()
    with pytest.raises(ValueError, match="takes input_ids, not inputs_embeds"):
        ours.generate(inputs_embeds=ours.base_model.model.get_input_embeddings()(ids), max_new_tokens=2)
    with pytest.raises(ValueError, match="2-D attention mask.*default dynamic cache"):
        ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0,
                      cache_implementation="static")
    assert "prepare_inputs_for_generation" not in vars(ours.base_model.model)  # put back
    zoo = get_peft_model(load_model(hf_dir), PrefixTuningConfig(num_virtual_tokens=3))
    with pytest.raises(ValueError, match="no HF generate .*peft_model.new_cache"):
        zoo.generate(ids)
