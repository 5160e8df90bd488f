"""Prefix and prompt tuning on HF encoder-decoder models (tiny random T5 and BART,
``task_type="SEQ_2_SEQ_LM"``) against HF PEFT's ``PeftModelForSeq2SeqLM``: the same trainable
parameters, config fields and files; adapters cross-load both ways with the same logits and loss
(fp32, 1e-5); greedy generate gives PEFT's tokens; only the prompt encoder trains."""

import json

import pytest
import torch
import transformers
from peft import PeftModel as HFPeftModel
from peft import PrefixTuningConfig as HFPrefixTuningConfig
from peft import PromptTuningConfig as HFPromptTuningConfig
from peft import get_peft_model as hf_get_peft_model
from safetensors.torch import load_file

import mlx_core
from mlx_adapters import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model

from .helpers import (
    hf_peft_generate,
    left_padded_batch,
    peft_reads_transformers_cache,
    save_tiny_llama,
)

pytestmark = pytest.mark.hf_parity

# Weights drawn at `scale` times the usual size (for generate: greedy decoding of the usual tiny
# random models repeats one token from the start). Three layers: PEFT gives decoder layer i the
# prefix's layer 2i mod 3 (0, 2, 1), which two layers would not tell apart from other orders.
CONFIGS = {
    "t5": lambda scale: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=128, d_model=32, d_kv=16, d_ff=64, num_layers=3, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, initializer_factor=scale)),
    "bart": lambda scale: transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=128, d_model=32, encoder_layers=3, decoder_layers=3, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        init_std=0.02 * scale, eos_token_id=127, forced_eos_token_id=None)),
}
SCALE = {"t5": 3.0, "bart": 10.0}
METHODS = {"prefix": (PrefixTuningConfig, HFPrefixTuningConfig),
           "prompt": (PromptTuningConfig, HFPromptTuningConfig)}
LAYOUT = ("peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_transformer_submodules")

IDS = torch.randint(2, 120, (2, 7), generator=torch.Generator().manual_seed(0))
MASK = torch.ones_like(IDS)
MASK[1, 5:] = 0
LABELS = torch.randint(2, 120, (2, 5), generator=torch.Generator().manual_seed(1))
LABELS[1, 4:] = -100
DECODER_IDS = torch.randint(2, 120, (2, 4), generator=torch.Generator().manual_seed(2))
DECODER_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])


def _base(arch, scale=None):
    torch.manual_seed(0)
    return CONFIGS[arch](SCALE[arch] if scale is None else scale).eval()


def _outputs(model):
    """Logits and loss of a forward with labels, and logits of one with decoder ids and mask."""
    with torch.no_grad():
        with_labels = model(input_ids=IDS, attention_mask=MASK, labels=LABELS)
        with_decoder = model(input_ids=IDS, attention_mask=MASK, decoder_input_ids=DECODER_IDS,
                             decoder_attention_mask=DECODER_MASK)
    return with_labels.logits, with_labels.loss, with_decoder.logits


def _assert_same_outputs(got, want):
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", CONFIGS)
def test_layout_files_and_logits_equal_peft(tmp_path, arch, method):
    ours_config, theirs_config = METHODS[method]
    torch.manual_seed(1)
    theirs = hf_get_peft_model(_base(arch), theirs_config(task_type="SEQ_2_SEQ_LM",
                                                          num_virtual_tokens=4)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    torch.manual_seed(2)
    ours = get_peft_model(_base(arch), ours_config(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4)).eval()
    ours.save_pretrained(tmp_path / "ours")

    def trainable(model):
        return {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    assert trainable(ours) == trainable(theirs)
    files = {side: (json.loads((tmp_path / side / "adapter_config.json").read_text()),
                    load_file(tmp_path / side / "adapter_model.safetensors")) for side in ("ours", "theirs")}
    (our_config, our_weights), (their_config, their_weights) = files["ours"], files["theirs"]
    assert {k: our_config[k] for k in LAYOUT} == {k: their_config[k] for k in LAYOUT}
    assert our_config["num_transformer_submodules"] == 2
    assert {k: t.shape for k, t in our_weights.items()} == {k: t.shape for k, t in their_weights.items()}
    # prefix: 4 x (3 layers * 2 * 32); prompt: PEFT's 2 * 4 rows (the encoder uses the first 4)
    assert their_weights["prompt_embeddings"].shape == ((4, 192) if method == "prefix" else (8, 32))

    loaded = PeftModel.from_pretrained(_base(arch), tmp_path / "theirs").eval()
    want = _outputs(theirs)
    _assert_same_outputs(_outputs(loaded), want)
    assert (want[0] - _outputs(_base(arch))[0]).abs().max() > 1e-3  # the adapter does something
    reloaded = HFPeftModel.from_pretrained(_base(arch), tmp_path / "ours").eval()
    _assert_same_outputs(_outputs(reloaded), _outputs(ours))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", CONFIGS)
def test_generate_equals_peft_generate(tmp_path, arch, method):
    """Greedy generate with the adapter saved by PEFT, for a padded batch of two, with and
    without a cache: PEFT's tokens. Prompt tuning: PEFT's own ``generate`` (the prompt goes into
    the encoder once). Prefix tuning: PEFT 0.21's seq2seq ``prepare_inputs_for_generation`` sets
    the prefix as ``past_key_values`` while transformers 5 passes generate's (empty) cache as
    ``cache``; the forward gets both, keeps ``cache`` and drops the prefix, so PEFT's tokens are
    the base model's. ``hf_peft_generate`` renames the cache for PEFT's logic (its only change);
    PEFT 0.22 reads transformers' name itself, and its own generate is right for both."""
    ours_config, theirs_config = METHODS[method]
    torch.manual_seed(1)
    theirs = hf_get_peft_model(_base(arch), theirs_config(task_type="SEQ_2_SEQ_LM",
                                                          num_virtual_tokens=4)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    ours = PeftModel.from_pretrained(_base(arch), tmp_path / "theirs").eval()
    ids, mask = left_padded_batch()
    greedy = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    want = hf_peft_generate(theirs, **greedy)
    for use_cache in (True, False):
        assert torch.equal(ours.generate(**greedy, use_cache=use_cache), want)
    plain = _base(arch).generate(**greedy)
    assert want.shape == plain.shape == (2, 1 + 8) and not torch.equal(want, plain)
    with torch.no_grad():  # PEFT's own generate: right for a prompt; before PEFT 0.22, without
        # the prefix for a prefix
        right = method == "prompt" or peft_reads_transformers_cache()
        assert torch.equal(theirs.generate(**greedy), want if right else plain)
    with ours.disable_adapter():
        assert torch.equal(ours.generate(**greedy), plain)


@pytest.mark.parametrize("method", METHODS)
def test_only_the_prompt_encoder_trains(method):
    base = _base("t5", scale=1.0)  # the usual weights: a smooth loss
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, METHODS[method][0](task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "prompt_encoder.default.embedding.weight"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(6):
        loss = model(input_ids=IDS, attention_mask=MASK, labels=LABELS).loss
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if "prompt_encoder" not in n)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_bad_input_names_the_fix(tmp_path):
    zoo = mlx_core.build_model(mlx_core.get_preset("tiny-llama"))
    for config in (PrefixTuningConfig(num_transformer_submodules=2),
                   PromptTuningConfig(task_type="SEQ_2_SEQ_LM")):
        with pytest.raises(ValueError, match="is decoder-only.*set task_type='CAUSAL_LM' and "
                                             r"num_transformer_submodules=1 \(or leave it None\)"):
            get_peft_model(zoo, config)
    with pytest.raises(ValueError, match="is an encoder-decoder model.*set task_type='SEQ_2_SEQ_LM'"):
        get_peft_model(_base("t5"), PrefixTuningConfig(num_virtual_tokens=2))  # CAUSAL_LM by default
    with pytest.raises(ValueError, match=r"num_transformer_submodules must be None \(from task_type\), "
                                         r"1 \(decoder-only\) or 2"):
        PromptTuningConfig(num_transformer_submodules=3)
    get_peft_model(_base("t5"), PrefixTuningConfig(task_type="SEQ_2_SEQ_LM")).save_pretrained(tmp_path / "t5")
    llama = transformers.LlamaForCausalLM.from_pretrained(save_tiny_llama(tmp_path / "llama"))
    with pytest.raises(ValueError, match="LlamaForCausalLM is decoder-only"):
        PeftModel.from_pretrained(llama, tmp_path / "t5")
    prompted = get_peft_model(_base("t5"), PromptTuningConfig(task_type="SEQ_2_SEQ_LM"))
    with pytest.raises(ValueError, match="takes input_ids=..."):
        prompted.generate(max_new_tokens=2)
