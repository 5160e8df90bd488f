"""PiSSA / OLoRA adapters saved as plain LoRA for the original base model
(``save_pretrained(..., path_initial_model_for_weight_conversion=DIR)``): the same files as HF
PEFT's conversion (keys, config, tensors within 1e-6), and on the unmodified base, in ours and in
HF PEFT, the same logits as the trained adapter on its residual base (1e-5, fp32)."""

import json

import pytest
import torch
import transformers
from peft import LoraConfig as HFLoraConfig
from peft import PeftModel as HFPeftModel
from peft import get_peft_model as hf_get_peft_model
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from mlx_adapters import LoraConfig, PeftModel, get_peft_model
from mlx_core import load_model

from .helpers import save_tiny_llama

pytestmark = pytest.mark.hf_parity

IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("pissa") / "base")


def _logits(model):
    with torch.no_grad():
        out = model(IDS)
    return out.logits if hasattr(out, "logits") else out


def _trained(base_dir, tmp_path, init, use_rslora=False):
    """Ours: initialise, save the initial adapter, move the adapter as training would."""
    model = get_peft_model(load_model(base_dir), LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, use_rslora=use_rslora))
    model.peft_config["default"].init_lora_weights = True  # PEFT's recipe for the initial copy
    model.save_pretrained(tmp_path / "init")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("init,use_rslora", [("pissa", False), ("olora", False), ("pissa", True)])
def test_conversion_equals_peft_and_runs_on_the_original_base(base_dir, tmp_path, init, use_rslora):
    ours = _trained(base_dir, tmp_path, init, use_rslora)
    trained_logits = _logits(ours.eval())
    ours.save_pretrained(tmp_path / "trained")
    ours.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init")

    theirs = hf_get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base_dir), HFLoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, use_rslora=use_rslora))
    theirs.peft_config["default"].init_lora_weights = True
    theirs.save_pretrained(tmp_path / "theirs_init")
    set_peft_model_state_dict(theirs, load_file(tmp_path / "trained" / "adapter_model.safetensors"))
    theirs.save_pretrained(tmp_path / "theirs_lora",
                           path_initial_model_for_weight_conversion=str(tmp_path / "theirs_init"))

    mine = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    peft_files = load_file(tmp_path / "theirs_lora" / "adapter_model.safetensors")
    assert mine.keys() == peft_files.keys()
    for key, tensor in mine.items():
        assert tensor.shape == peft_files[key].shape
        assert (tensor - peft_files[key]).abs().max() < 1e-6, key
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "theirs_lora" / "adapter_config.json").read_text())
    for field in ("r", "lora_alpha", "init_lora_weights", "use_rslora"):
        assert config[field] == pytest.approx(peft_config[field]), field
    assert config["r"] == 8 and config["init_lora_weights"] is True

    on_original = PeftModel.from_pretrained(load_model(base_dir), tmp_path / "lora")
    assert (_logits(on_original.eval()) - trained_logits).abs().max() < 1e-5
    hf_on_original = HFPeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(base_dir), tmp_path / "lora")
    assert (_logits(hf_on_original.eval()) - trained_logits).abs().max() < 1e-5


def test_conversion_needs_the_matching_initial_adapter(base_dir, tmp_path):
    ours = _trained(base_dir, tmp_path, "pissa")
    with pytest.raises(FileNotFoundError, match="before training"):
        ours.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "nope")
    other = get_peft_model(load_model(base_dir), LoraConfig(r=2, target_modules=TARGETS))
    other.save_pretrained(tmp_path / "rank2")
    with pytest.raises(ValueError, match="does not match"):
        ours.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "rank2")
    assert not (tmp_path / "out").exists()  # nothing half-written
