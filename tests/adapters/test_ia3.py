"""(IA)³ against HF PEFT: cross-loading both ways (1e-5, fp32), merge, disable."""

import pytest
import torch
import transformers
from peft import IA3Config as HFIA3Config
from peft import PeftModel as HFPeftModel
from peft import get_peft_model as hf_get_peft_model

from mlx_adapters import IA3Config, PeftModel, get_peft_model
from mlx_core import load_model

from .helpers import assert_base_restored, loss_and_grads_under_autocast, save_tiny_llama

pytestmark = pytest.mark.hf_parity

IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
CONFIG = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])


@pytest.fixture
def hf_dir(tmp_path):
    return save_tiny_llama(tmp_path / "base", attention_bias=True)


def _logits(model):
    with torch.no_grad():
        out = model(IDS)
    return out.logits if hasattr(out, "logits") else out


def test_cross_loads_with_hf_peft_both_ways(hf_dir, tmp_path):
    theirs = hf_get_peft_model(transformers.LlamaForCausalLM.from_pretrained(hf_dir),
                               HFIA3Config(init_ia3_weights=False, **CONFIG)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    ours = PeftModel.from_pretrained(load_model(hf_dir), tmp_path / "theirs").eval()
    assert (_logits(ours) - _logits(theirs)).abs().max() < 1e-5

    torch.manual_seed(1)
    mine = get_peft_model(load_model(hf_dir), IA3Config(init_ia3_weights=False, **CONFIG)).eval()
    mine.save_pretrained(tmp_path / "mine")
    loaded = HFPeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(hf_dir),
                                         tmp_path / "mine").eval()
    assert (_logits(loaded) - _logits(mine)).abs().max() < 1e-5


def test_identity_at_init_merge_and_disable(hf_dir):
    base = load_model(hf_dir)
    reference = _logits(base).clone()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    assert torch.equal(_logits(get_peft_model(load_model(hf_dir), IA3Config(**CONFIG)).eval()), reference)
    torch.manual_seed(2)
    model = get_peft_model(base, IA3Config(init_ia3_weights=False, **CONFIG)).eval()
    adapted = _logits(model)
    with model.disable_adapter():
        assert torch.equal(_logits(model), reference)
    model.merge_adapter()
    assert (_logits(model) - adapted).abs().max() < 1e-5
    model.unmerge_adapter()
    assert_base_restored(model, before)  # bit for bit: unmerge restores the kept original
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".ia3_l." in n for n in trainable)


def test_training_under_bf16_autocast_matches_hf_peft(hf_dir, tmp_path):
    """Under ``torch.autocast`` (bf16, as HF Trainer's ``bf16=True``): the loss and the (IA)³
    vectors' gradients equal HF PEFT's under the same autocast, within bf16's precision (loss 2%,
    each gradient 5% of its norm), on an HF model and a zoo one; gradients stay fp32."""
    torch.manual_seed(3)
    theirs = hf_get_peft_model(transformers.LlamaForCausalLM.from_pretrained(hf_dir),
                               HFIA3Config(init_ia3_weights=False, **CONFIG))
    theirs.save_pretrained(tmp_path / "adapter")
    want_loss, want = loss_and_grads_under_autocast(theirs, IDS)
    for base in (transformers.LlamaForCausalLM.from_pretrained(hf_dir), load_model(hf_dir)):
        ours = PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True)
        loss, got = loss_and_grads_under_autocast(ours, IDS)
        assert abs(loss - want_loss) < 2e-2 * abs(want_loss)
        assert sorted(got) == sorted(want) and len(got) == 2 * 3  # k, v, down of both layers
        for name, g in got.items():
            assert g.dtype == torch.float32, name
            assert (g - want[name]).norm() <= 0.05 * want[name].norm(), name
