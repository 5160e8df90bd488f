"""Prompt tuning against HF PEFT: cross-loading both ways (1e-5, fp32) on HF and zoo models;
the token ids of HF generate equal PEFT's (exact)."""

import pytest
import torch
import transformers
from peft import PeftModel as HFPeftModel
from peft import PromptTuningConfig as HFPromptTuningConfig
from peft import get_peft_model as hf_get_peft_model

import mlx_core
from mlx_adapters import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
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


@pytest.fixture
def hf_dir(tmp_path):
    return save_tiny_llama(tmp_path / "base")


def _hf(directory):
    return transformers.LlamaForCausalLM.from_pretrained(directory).eval()


def _logits(model, mask=None):
    with torch.no_grad():
        out = model(input_ids=IDS, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out


def test_cross_loads_with_hf_peft(hf_dir, tmp_path):
    mask = torch.ones_like(IDS)
    mask[1, 6:] = 0
    torch.manual_seed(1)
    theirs = hf_get_peft_model(_hf(hf_dir), HFPromptTuningConfig(task_type="CAUSAL_LM",
                                                                 num_virtual_tokens=5)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    for base in (_hf(hf_dir), load_model(hf_dir)):
        ours = PeftModel.from_pretrained(base, tmp_path / "theirs").eval()
        got, want = _logits(ours, mask), _logits(theirs, mask)
        assert got.shape == (2, 5 + 9, 128)
        keep = torch.cat([torch.ones(2, 5, dtype=torch.bool), mask.bool()], dim=1)
        assert (got[keep] - want[keep]).abs().max() < 1e-5

    torch.manual_seed(2)
    mine = get_peft_model(load_model(hf_dir), PromptTuningConfig(num_virtual_tokens=4)).eval()
    mine.save_pretrained(tmp_path / "mine")
    loaded = HFPeftModel.from_pretrained(_hf(hf_dir), tmp_path / "mine").eval()
    assert (_logits(loaded) - _logits(mine)).abs().max() < 1e-5


def test_only_the_prompt_trains_and_text_init(hf_dir):
    model = get_peft_model(load_model(hf_dir), PromptTuningConfig(num_virtual_tokens=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_encoder.default.embedding.weight"]
    losses = train_losses(model, IDS, steps=10, lr=0.1)
    assert losses[-1] < losses[0]
    with model.disable_adapter():
        assert _logits(model).shape == (2, 9, 128)
    with pytest.raises(ValueError, match="cannot share one model"):
        model.add_adapter("lora", LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        PromptTuningConfig(prompt_tuning_init="TEXT", prompt_tuning_init_text="Classify:")


@pytest.mark.builtin_model
def test_text_init_copies_the_texts_token_embeddings(builtin_model_dir):
    from mlx_core import load_tokenizer

    model = load_model("smollm2-135m-instruct")
    config = PromptTuningConfig(num_virtual_tokens=8, prompt_tuning_init="TEXT",
                                prompt_tuning_init_text="Classify the sentiment:",
                                tokenizer_name_or_path="smollm2-135m-instruct")
    ids = load_tokenizer("smollm2-135m-instruct").encode("Classify the sentiment:",
                                                         add_special_tokens=False)
    ids = (ids * 8)[:8]
    peft_model = get_peft_model(model, config)
    prompt = peft_model.prompt_encoder["default"].embedding.weight
    assert torch.equal(prompt, model.model.embed_tokens.weight[torch.tensor(ids)])

def test_generate_equals_peft_generate(hf_dir, tmp_path):
    """HF generate with a prompt-tuning adapter (the virtual tokens' embeddings in front on the
    first step, the mask extended at every step): greedy and sampled (one torch seed) token ids
    equal HF PEFT's exactly, for a left-padded batch of two prompts, with and without a cache;
    inside ``disable_adapter()`` the base model's own."""
    torch.manual_seed(1)
    theirs = hf_get_peft_model(_hf(hf_dir), HFPromptTuningConfig(task_type="CAUSAL_LM",
                                                                 num_virtual_tokens=5)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    ours = PeftModel.from_pretrained(_hf(hf_dir), tmp_path / "theirs").eval()
    ids, mask = left_padded_batch()
    greedy = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0, do_sample=False)
    for options in (greedy, {**greedy, "do_sample": True, "top_k": 0, "temperature": 2.0}):
        torch.manual_seed(7)
        want = hf_peft_generate(theirs, **options)
        for use_cache in (True, False):
            torch.manual_seed(7)
            assert torch.equal(ours.generate(**options, use_cache=use_cache), want)
    got = ours.generate(**greedy)
    assert got.shape == (2, 7 + 10) and torch.equal(got[:, :7], ids)
    with torch.no_grad():  # PEFT's generate as it is: right without a cache
        assert torch.equal(theirs.generate(**greedy, use_cache=False), got)
    plain = _hf(hf_dir).generate(**greedy)
    assert not torch.equal(got, plain)  # the prompt changes the tokens
    with ours.disable_adapter():
        assert torch.equal(ours.generate(**greedy), plain)


def test_generate_bad_input_names_the_fix(hf_dir):
    ours = get_peft_model(_hf(hf_dir), PromptTuningConfig(num_virtual_tokens=3)).eval()
    zoo = get_peft_model(mlx_core.build_model(mlx_core.get_preset("tiny-llama")),
                         PromptTuningConfig(num_virtual_tokens=3))
    assert_prompt_generate_refusals(ours, zoo, r"no HF generate .*call peft_model\(ids\) for each new token")
