"""LoRA over mlx_core's int8 / int4 layers (QLoRA-style through the quantization transform):
the adapters train in fp32 beside a frozen quantized base, equal to LoRA over the same model in
fp32 with the de-quantized weights, save and load in PEFT's format, and merge by de-quantizing."""

import copy

import pytest
import torch
from torch import nn

from mlx_adapters import LoraConfig, get_peft_model
from mlx_core import build_model, get_preset
from mlx_core.transforms import Int4Linear, Int8Linear, QuantizedLinear, quantize

from .helpers import assert_trains_saves_and_merges, train_losses

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
CONFIG = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)


def _model():
    torch.manual_seed(0)
    return build_model(get_preset("tiny-llama")).eval()


def _dequantized_twin(quantized: nn.Module) -> nn.Module:
    twin = copy.deepcopy(_model())
    modules = dict(quantized.named_modules())
    with torch.no_grad():
        for name, layer in twin.named_modules():
            if isinstance(modules.get(name), QuantizedLinear):
                layer.weight = nn.Parameter(modules[name].dequantized_weight())
        twin.model.embed_tokens.weight.copy_(quantized.model.embed_tokens.dequantized_weight())
    return twin


@pytest.mark.parametrize("scheme,kind", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_lora_on_a_quantized_base_equals_lora_on_its_dequantized_weights(scheme, kind, monkeypatch):
    base = quantize(_model(), scheme)
    twin = _dequantized_twin(base)
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(**CONFIG))
    torch.manual_seed(1)
    reference = get_peft_model(twin, LoraConfig(**CONFIG))
    wrapped = [m for m in model.modules() if hasattr(m, "base_layer")]
    assert len(wrapped) == 2 * 7 and all(isinstance(m.base_layer, kind) for m in wrapped)
    assert all(m.lora_A["default"].weight.dtype == torch.float32 for m in wrapped)
    monkeypatch.setenv("MLX_KERNELS", "torch")  # the references: exact arithmetic on both sides
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), reference(IDS), atol=1e-5, rtol=1e-5)
    losses, reference_losses = train_losses(model, IDS, steps=4), train_losses(reference, IDS, steps=4)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_adapter_trains_saves_and_merges_over_a_quantized_base(tmp_path, scheme, monkeypatch):
    """Compared with the reference kernels (the CPU fast paths round activations to bf16, the
    merged fp32 layers do not)."""
    monkeypatch.setenv("MLX_KERNELS", "torch")
    merged = assert_trains_saves_and_merges(lambda: quantize(_model(), scheme), "qweight", IDS,
                                            tmp_path / "adapter")
    # de-quantized: 4/8 bits cannot hold the sum
    assert not any(isinstance(m, QuantizedLinear) for m in merged.model.layers.modules())
