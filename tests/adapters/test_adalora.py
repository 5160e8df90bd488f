"""AdaLoRA against HF PEFT: one seed gives the same adapter; training with the same data and
optimizer gives the same losses, masks, rank patterns and parameters step by step; the saved
adapter (resized by its rank pattern) cross-loads both ways with the same logits (1e-5, fp32)."""

import json

import pytest
import torch
import transformers
from peft import AdaLoraConfig as HFAdaLoraConfig
from peft import PeftModel as HFPeftModel
from peft import get_peft_model as hf_get_peft_model
from safetensors.torch import load_file

from mlx_adapters import AdaLoraConfig, PeftModel, get_peft_model
from mlx_core import load_model

from .helpers import assert_base_restored, save_tiny_llama

pytestmark = pytest.mark.hf_parity

IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
CONFIG = dict(init_r=4, target_r=2, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
              total_step=8, tinit=2, tfinal=2, deltaT=2)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("adalora") / "base")


def _hf(directory):
    return transformers.LlamaForCausalLM.from_pretrained(directory)


def _logits(model):
    with torch.no_grad():
        out = model(input_ids=IDS)
    return out.logits if hasattr(out, "logits") else out


def _loss(out):
    return out.loss if hasattr(out, "loss") else out


def _pair(hf_dir, seed=1, zoo=False, **overrides):
    """PEFT's and our AdaLoRA model from one seed (ours on the zoo model if ``zoo``)."""
    config = {**CONFIG, **overrides}
    torch.manual_seed(seed)  # task_type: PEFT adds the orthogonal regularisation in its CausalLM model
    theirs = hf_get_peft_model(_hf(hf_dir), HFAdaLoraConfig(task_type="CAUSAL_LM", **config))
    torch.manual_seed(seed)
    ours = get_peft_model(load_model(hf_dir) if zoo else _hf(hf_dir), AdaLoraConfig(**config))
    return theirs, ours


def test_one_seed_gives_peft_s_adapter(hf_dir):
    theirs, ours = _pair(hf_dir)
    want, got = theirs.state_dict(), ours.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, p in theirs.named_parameters() if p.requires_grad}
    ours.print_trainable_parameters()


@pytest.mark.parametrize("zoo", [False, True])
def test_training_matches_peft_step_by_step(hf_dir, tmp_path, zoo):
    theirs, ours = _pair(hf_dir, seed=2, zoo=zoo)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
                  for m in (theirs, ours)]
    patterns = []
    for step in range(11):  # warm-up, budgeting (masks every deltaT), the final fixed masks
        losses = []
        for model, update, opt in ((theirs, theirs.base_model.update_and_allocate, optimizers[0]),
                                   (ours, ours.update_and_allocate, optimizers[1])):
            loss = _loss(model(input_ids=IDS, labels=IDS))
            loss.backward()
            opt.step()
            update(step)
            opt.zero_grad()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-5, step
        want = theirs.peft_config["default"].rank_pattern
        assert ours.peft_config["default"].rank_pattern == want, step
        patterns.append(want)
    assert patterns[3] is None and patterns[4] is not None  # the first mask: after tinit, every deltaT
    kept = sum(sum(v) for v in patterns[-1].values())
    assert kept == 2 * 6  # target_r x 6 layers after the final allocation
    want, got = dict(theirs.named_parameters()), dict(ours.named_parameters())
    for name, p in want.items():
        assert (got[name] - p).abs().max() < 1e-5, name

    theirs.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    saved = [load_file(tmp_path / d / "adapter_model.safetensors") for d in ("theirs", "ours")]
    assert set(saved[0]) == set(saved[1])
    assert all(torch.allclose(saved[0][k], saved[1][k], rtol=0, atol=1e-5) for k in saved[0])
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("theirs", "ours")]
    assert configs[0]["rank_pattern"] == configs[1]["rank_pattern"]
    assert saved[1]["base_model.model.model.layers.0.self_attn.q_proj.lora_A"].shape[0] == \
        sum(configs[1]["rank_pattern"]["model.layers.0.self_attn.q_proj.lora_E"])

    reference = _logits(theirs.eval())
    for directory in ("theirs", "ours"):
        for base in (_hf(hf_dir), load_model(hf_dir)):
            loaded = PeftModel.from_pretrained(base, tmp_path / directory).eval()
            assert (_logits(loaded) - reference).abs().max() < 1e-5
        back = HFPeftModel.from_pretrained(_hf(hf_dir), tmp_path / directory).eval()
        assert (_logits(back) - reference).abs().max() < 1e-5


def test_random_adapter_cross_loads_and_merges(hf_dir, tmp_path):
    torch.manual_seed(3)
    theirs = hf_get_peft_model(_hf(hf_dir), HFAdaLoraConfig(init_lora_weights=False, **CONFIG)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    base = load_model(hf_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ours = PeftModel.from_pretrained(base, tmp_path / "theirs").eval()
    adapted = _logits(ours)
    assert (adapted - _logits(theirs)).abs().max() < 1e-5
    assert (adapted - _logits(load_model(hf_dir))).abs().max() > 1e-3
    assert not any(p.requires_grad for p in ours.parameters())
    with ours.disable_adapter():
        assert torch.equal(_logits(ours), _logits(load_model(hf_dir)))
    ours.merge_adapter()
    assert (_logits(ours) - adapted).abs().max() < 1e-5
    ours.unmerge_adapter()
    assert_base_restored(ours, before)  # bit for bit: unmerge restores the kept original
    assert (_logits(ours.merge_and_unload()) - adapted).abs().max() < 1e-5


def test_bad_input_names_the_problem(hf_dir, tmp_path):
    from typer.testing import CliRunner

    from mlx_core.cli.app import build_app

    with pytest.raises(ValueError, match="total_step"):
        AdaLoraConfig(target_modules=["q_proj"])
    with pytest.raises(ValueError, match="no budgeting phase"):
        AdaLoraConfig(target_modules=["q_proj"], total_step=10, tinit=6, tfinal=4)
    with pytest.raises(ValueError, match="DoRA"):
        AdaLoraConfig(target_modules=["q_proj"], total_step=10, use_dora=True)
    model = get_peft_model(load_model(hf_dir), AdaLoraConfig(**CONFIG))
    with pytest.raises(ValueError, match="after loss.backward"):
        model.update_and_allocate(0)
    with pytest.raises(ValueError, match="one adapter at a time"):
        model.add_adapter("second", AdaLoraConfig(**CONFIG))
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load_model(hf_dir), tmp_path / "adapter")
    with pytest.raises(ValueError, match="needs a trainable AdaLoRA adapter"):
        loaded.update_and_allocate(0)
    with pytest.raises(ValueError, match="combines LoRA adapters only"):
        model.add_weighted_adapter(["default"], [1.0], "mix", combination_type="cat")
    runner = CliRunner()
    assert "adalora" in runner.invoke(build_app(), ["adapters", "methods"]).output
    inspected = runner.invoke(build_app(), ["adapters", "inspect", str(tmp_path / "adapter")])
    assert inspected.exit_code == 0 and "ADALORA" in inspected.output, inspected.output
