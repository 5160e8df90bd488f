"""add_weighted_adapter against HF PEFT: the combined adapter gives the same logits (1e-5)."""

import pytest
import torch
import transformers
from peft import LoraConfig as HFLoraConfig
from peft import get_peft_model as hf_get_peft_model

from mlx_adapters import PeftModel
from mlx_core import load_model

pytestmark = pytest.mark.hf_parity

IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        out = model(IDS)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("combination", ["cat", "linear", "svd"])
def test_combined_adapter_matches_peft(tmp_path, combination):
    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)).save_pretrained(base_dir)
    theirs = hf_get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base_dir), HFLoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "one")
    theirs.add_adapter("two", HFLoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj"],
                                           init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "saved")  # PEFT: one sub-directory per named adapter
    ours = PeftModel.from_pretrained(load_model(base_dir), tmp_path / "saved" / "one", adapter_name="one")
    ours.load_adapter(tmp_path / "saved" / "two", "two")

    weights = [0.7, -0.4]
    rank = 6 if combination == "svd" else None
    theirs.add_weighted_adapter(["one", "two"], weights, "mix", combination_type=combination,
                                svd_rank=rank)
    ours.add_weighted_adapter(["one", "two"], weights, "mix", combination_type=combination,
                              svd_rank=rank)
    theirs.set_adapter("mix")
    ours.set_adapter("mix")
    assert (_logits(ours.eval()) - _logits(theirs.eval())).abs().max() < 1e-5
