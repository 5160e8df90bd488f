"""LoRA's bias modes (``bias="all"|"lora_only"``, ``lora_bias=True``) and its SVD/QR inits
(PiSSA, OLoRA) against HF PEFT: the same trainable parameters, saved keys and logits (1e-5, fp32)
in both directions; PiSSA's residual base and A/B equal PEFT's on the same weights."""

import pytest
import torch
import transformers
from peft import LoraConfig as HFLoraConfig
from peft import PeftModel as HFPeftModel
from peft import get_peft_model as hf_get_peft_model
from safetensors.torch import load_file

from mlx_adapters import LoraConfig, PeftModel, get_peft_model
from mlx_core import load_model

from .helpers import assert_base_restored

pytestmark = pytest.mark.hf_parity

IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "v_proj", "up_proj"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Llama with biases on every attention and MLP projection."""
    path = tmp_path_factory.mktemp("bias") / "base"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.1)
    model.save_pretrained(path)
    return path


def _hf(directory):
    return transformers.LlamaForCausalLM.from_pretrained(directory).eval()


def _logits(model):
    with torch.no_grad():
        out = model(IDS)
    return out.logits if hasattr(out, "logits") else out


def _train_like(model, seed):
    """Move what trains (adapter weights and the trainable biases) as training would."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bias,lora_bias", [("all", False), ("lora_only", False), ("none", True),
                                            ("lora_only", True)])
def test_bias_modes_cross_load_with_hf_peft(hf_dir, tmp_path, bias, lora_bias):
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS, bias=bias, lora_bias=lora_bias)
    theirs = hf_get_peft_model(_hf(hf_dir), HFLoraConfig(**config))
    ours = get_peft_model(_hf(hf_dir), LoraConfig(**config))
    assert _trainable(ours) == _trainable(theirs)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    if lora_bias:
        assert not ours.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].bias.any()

    _train_like(theirs, 1)
    theirs(input_ids=IDS, labels=IDS).loss.backward()
    want = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for base in (_hf(hf_dir), load_model(hf_dir)):  # the same gradients reach the same biases
        model = get_peft_model(base, LoraConfig(**config))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, p in theirs.named_parameters():
                if p.requires_grad:
                    params[name].copy_(p)
        out = model(IDS, labels=IDS)
        (out.loss if hasattr(out, "loss") else out).backward()
        for name, grad in want.items():
            assert (params[name].grad - grad).abs().max() < 1e-5, name
    theirs.save_pretrained(tmp_path / "theirs")
    saved = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    for base in (_hf(hf_dir), load_model(hf_dir)):
        loaded = PeftModel.from_pretrained(base, tmp_path / "theirs").eval()
        assert (_logits(loaded) - _logits(theirs.eval())).abs().max() < 1e-5
        loaded.save_pretrained(tmp_path / "again")  # the same keys and tensors back
        again = load_file(tmp_path / "again" / "adapter_model.safetensors")
        assert set(again) == set(saved)
        assert all(torch.equal(again[k], saved[k]) for k in saved)

    mine = get_peft_model(load_model(hf_dir), LoraConfig(**config))
    _train_like(mine, 2)
    mine.save_pretrained(tmp_path / "mine")
    assert set(load_file(tmp_path / "mine" / "adapter_model.safetensors")) == set(saved)
    back = HFPeftModel.from_pretrained(_hf(hf_dir), tmp_path / "mine").eval()
    assert (_logits(back) - _logits(mine.eval())).abs().max() < 1e-5


def test_lora_bias_merges_and_unmerges(hf_dir):
    base = load_model(hf_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                            lora_bias=True, lora_dropout=0.0))
    _train_like(model, 3)
    model.eval()
    adapted = _logits(model)
    model.merge_adapter()
    assert (_logits(model) - adapted).abs().max() < 1e-5
    model.unmerge_adapter()
    assert_base_restored(model, before)  # bit for bit: unmerge restores the kept original
    with model.disable_adapter():  # the bias went up and back down: equal to rounding
        assert (_logits(model) - _logits(load_model(hf_dir))).abs().max() < 1e-6
    assert (_logits(model.merge_and_unload()) - adapted).abs().max() < 1e-5

    no_bias = get_peft_model(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2)), LoraConfig(target_modules=["q_proj"], lora_bias=True))
    with pytest.raises(RuntimeError, match="no bias to fold it into"):
        no_bias.merge_adapter()
    with pytest.raises(ValueError, match="lora_bias=True works with init_lora_weights=True or False"):
        LoraConfig(lora_bias=True, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="DoRA"):
        LoraConfig(lora_bias=True, use_dora=True)


def _layers(model):
    """name -> (base weight, A, B) of every LoRA layer, for PEFT's model and ours alike."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            key = name.split("model.", 2)[-1]  # under base_model.model.
            out[key] = (module.base_layer.weight, module.lora_A["default"].weight,
                        module.lora_B["default"].weight)
    return out


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_svd_inits_equal_peft(hf_dir, init):
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=init)
    torch.manual_seed(4)  # the randomized SVD draws from torch's generator, in the same order
    theirs = hf_get_peft_model(_hf(hf_dir), HFLoraConfig(**config)).eval()
    torch.manual_seed(4)
    ours = get_peft_model(load_model(hf_dir), LoraConfig(**config)).eval()
    mine, peft_layers = _layers(ours), _layers(theirs)
    assert set(mine) == set(peft_layers) and len(mine) == 14
    for name, tensors in peft_layers.items():
        for got, want in zip(mine[name], tensors, strict=True):
            assert (got - want).abs().max() < 1e-6, name  # the same torch calls on the same weights
    # the residual plus the principal part is the original model
    assert (_logits(ours) - _logits(load_model(hf_dir))).abs().max() < 1e-4


def test_pissa_adapters_cross_load_with_hf_peft(hf_dir, tmp_path):
    """A PiSSA adapter re-derives the residual from the original base when loaded, as in PEFT."""
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights="pissa")
    theirs = hf_get_peft_model(_hf(hf_dir), HFLoraConfig(**config))
    _train_like(theirs, 5)
    theirs.save_pretrained(tmp_path / "theirs")
    for base in (_hf(hf_dir), load_model(hf_dir)):
        loaded = PeftModel.from_pretrained(base, tmp_path / "theirs").eval()
        assert (_logits(loaded) - _logits(theirs.eval())).abs().max() < 1e-5
    mine = get_peft_model(load_model(hf_dir), LoraConfig(**config))
    _train_like(mine, 6)
    mine.save_pretrained(tmp_path / "mine")
    back = HFPeftModel.from_pretrained(_hf(hf_dir), tmp_path / "mine").eval()
    assert (_logits(back) - _logits(mine.eval())).abs().max() < 1e-5
    merged = mine.merge_and_unload()  # the residual plus the trained principal part
    assert (_logits(merged) - _logits(back)).abs().max() < 1e-5


def test_pissa_refuses_a_quantized_base(hf_dir):
    from mlx_adapters import quantize_nf4

    with pytest.raises(ValueError, match="quantize the residual"):
        get_peft_model(quantize_nf4(load_model(hf_dir)),
                       LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa"))
