"""add_weighted_adapter against HF PEFT: the combined adapter gives the same logits (1e-5), for
every combination type (DARE's random masks: the same global seed before each side's merge)."""

import pytest
import torch
import transformers
from peft import LoraConfig as HFLoraConfig
from peft import get_peft_model as hf_get_peft_model

from mlx_adapters import PeftModel
from mlx_core import load_model

from .helpers import save_tiny_llama

pytestmark = pytest.mark.hf_parity

IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        out = model(IDS)
    return out.logits if hasattr(out, "logits") else out


COMBINATIONS = ["cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_linear_svd",
                "dare_ties", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"]


def _two_adapters(tmp_path):
    """A tiny HF Llama with PEFT adapters "one" and "two", and ours loaded from their files."""
    base_dir = save_tiny_llama(tmp_path / "base")
    theirs = hf_get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base_dir), HFLoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "one")
    theirs.add_adapter("two", HFLoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj"],
                                           init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "saved")  # PEFT: one sub-directory per named adapter
    ours = PeftModel.from_pretrained(load_model(base_dir), tmp_path / "saved" / "one", adapter_name="one")
    ours.load_adapter(tmp_path / "saved" / "two", "two")
    return theirs, ours


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_combined_adapter_matches_peft(tmp_path, combination):
    theirs, ours = _two_adapters(tmp_path)
    weights = [0.7, -0.4]
    kwargs = dict(combination_type=combination, svd_rank=6 if combination.endswith("svd") else None)
    if combination not in ("cat", "linear", "svd"):
        kwargs.update(density=0.5, majority_sign_method="frequency" if "ties" in combination
                      else "total")
    torch.manual_seed(1)
    theirs.add_weighted_adapter(["one", "two"], weights, "mix", **kwargs)
    torch.manual_seed(1)
    ours.add_weighted_adapter(["one", "two"], weights, "mix", **kwargs)
    theirs.set_adapter("mix")
    ours.set_adapter("mix")
    assert (_logits(ours.eval()) - _logits(theirs.eval())).abs().max() < 1e-5


def test_pruned_merges_differ_from_linear_and_keep_density(tmp_path):
    """TIES/DARE really prune: the merged A has about ``density`` of its entries non-zero
    (magnitude pruning exactly per adapter), and differs from the plain linear merge."""
    _, ours = _two_adapters(tmp_path)
    ours.add_weighted_adapter(["one", "two"], [1.0, 1.0], "lin", combination_type="linear")
    ours.add_weighted_adapter(["one", "two"], [1.0, 1.0], "mag", combination_type="magnitude_prune",
                              density=0.25)
    ours.add_weighted_adapter(["one", "two"], [1.0, 1.0], "dare", combination_type="dare_linear",
                              density=0.25, generator=torch.Generator().manual_seed(0))
    layer = ours.base_model.model.model.layers[0].self_attn.v_proj  # "one" only: one task tensor
    mag, dare, lin = (layer.lora_A[n].weight for n in ("mag", "dare", "lin"))
    assert (mag != 0).float().mean().item() == pytest.approx(0.25, abs=1e-3)
    assert 0.15 < (dare != 0).float().mean().item() < 0.35
    kept = dare != 0  # DARE rescales what it keeps by 1 / density
    assert torch.allclose(dare[kept], 4 * lin[kept], rtol=1e-6)


def test_bad_merge_arguments_say_what_to_pass(tmp_path):
    _, ours = _two_adapters(tmp_path)
    with pytest.raises(ValueError, match="density"):
        ours.add_weighted_adapter(["one", "two"], [1.0, 1.0], "x", combination_type="ties")
    with pytest.raises(ValueError, match="density"):
        ours.add_weighted_adapter(["one", "two"], [1.0, 1.0], "x", combination_type="dare_ties",
                                  density=1.5)
    with pytest.raises(ValueError, match="majority_sign_method"):
        ours.add_weighted_adapter(["one", "two"], [1.0, 1.0], "x", combination_type="ties",
                                  density=0.5, majority_sign_method="most")
    with pytest.raises(ValueError, match="combination_type must be one of"):
        ours.add_weighted_adapter(["one", "two"], [1.0, 1.0], "x", combination_type="avg")
    with pytest.raises(ValueError, match="one weight per adapter"):
        ours.add_weighted_adapter(["one", "two"], [1.0], "x", combination_type="cat")
    assert "x" not in ours.peft_config  # nothing half-made
