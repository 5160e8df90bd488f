"""modules_to_save (a classification head trained in full) against HF PEFT, both ways."""

import pytest
import torch
import transformers
from peft import LoraConfig as HFLoraConfig
from peft import PeftModel as HFPeftModel
from peft import get_peft_model as hf_get_peft_model

from mlx_adapters import LoraConfig, PeftModel, get_peft_model

pytestmark = pytest.mark.hf_parity

IDS = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(0))
CONFIG = dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["score"],
              task_type="SEQ_CLS", init_lora_weights=False)


@pytest.fixture
def classifier_dir(tmp_path):
    torch.manual_seed(0)
    transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0,
    )).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _base(directory):
    return transformers.LlamaForSequenceClassification.from_pretrained(directory).eval()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _train_head(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p))


def test_head_cross_loads_with_hf_peft(classifier_dir, tmp_path):
    theirs = hf_get_peft_model(_base(classifier_dir), HFLoraConfig(**CONFIG))
    _train_head(theirs, 1)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = PeftModel.from_pretrained(_base(classifier_dir), tmp_path / "theirs").eval()
    assert (_logits(ours) - _logits(theirs.eval())).abs().max() < 1e-5

    torch.manual_seed(2)
    mine = get_peft_model(_base(classifier_dir), LoraConfig(**CONFIG))
    assert {n for n, p in mine.named_parameters() if p.requires_grad} == \
        {n for n, p in theirs.named_parameters() if p.requires_grad}
    _train_head(mine, 3)
    mine.save_pretrained(tmp_path / "mine")
    loaded = HFPeftModel.from_pretrained(_base(classifier_dir), tmp_path / "mine").eval()
    assert (_logits(loaded) - _logits(mine.eval())).abs().max() < 1e-5


def test_head_is_trainable_disabled_and_unloaded(classifier_dir):
    base_logits = _logits(_base(classifier_dir))
    model = get_peft_model(_base(classifier_dir), LoraConfig(**CONFIG)).eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.score.modules_to_save.default.weight" in trainable
    assert not any("original_module" in n for n in trainable)
    _train_head(model, 4)
    adapted = _logits(model)
    with model.disable_adapter():
        assert torch.equal(_logits(model), base_logits)
    merged = model.merge_and_unload()
    assert isinstance(merged.score, torch.nn.Linear)
    assert (_logits(merged) - adapted).abs().max() < 1e-5


def test_unknown_module_is_named(classifier_dir):
    with pytest.raises(ValueError, match="modules_to_save=\\['head'\\].*score"):
        get_peft_model(_base(classifier_dir), LoraConfig(target_modules=["q_proj"], modules_to_save=["head"]))
