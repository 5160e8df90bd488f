"""QLoRA: NF4 base layers (0.5 byte/parameter + stated overhead) with LoRA adapters on top."""

import torch

from mlx_adapters import LoraConfig, NF4Linear, get_peft_model, quantize_nf4
from mlx_core import build_model, get_preset
from mlx_kernels.nf4 import ABSMAX_BLOCK, BLOCK_SIZE

from .helpers import assert_trains_saves_and_merges, loss_and_grads_under_autocast

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _model():
    torch.manual_seed(0)
    return build_model(get_preset("tiny-llama")).eval()


def test_base_weights_take_half_a_byte_per_parameter():
    model = quantize_nf4(_model())
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert len(layers) == 2 * 7  # q k v o gate up down, lm_head kept
    for layer in layers:
        n = layer.in_features * layer.out_features
        blocks = n // BLOCK_SIZE
        stored = sum(b.numel() * b.element_size() for b in layer.buffers())
        assert stored == n // 2 + blocks + 4 * -(-blocks // ABSMAX_BLOCK) + 4


def test_quantized_model_stays_close_to_the_original():
    reference = _model()
    with torch.no_grad():
        full = reference(IDS)
        quantized = quantize_nf4(_model())(IDS)
    # 4 bits per weight: NF4's RMS error on Gaussian weights is ~10% of their norm, and the
    # logits of this random model move by about as much (measured: 0.105)
    relative = (full - quantized).norm() / full.norm()
    assert 0 < relative < 0.2, relative


def test_qlora_trains_only_the_adapter_and_merges_exactly(tmp_path):
    assert_trains_saves_and_merges(lambda: quantize_nf4(_model()), "codes", IDS, tmp_path / "qlora")


def test_qlora_unmerge_gives_back_the_nf4_base():
    model = get_peft_model(quantize_nf4(_model()), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                              init_lora_weights=False)).eval()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with torch.no_grad():
        adapted = model(IDS)
        model.merge_adapter()  # de-quantizes the merged layers (4 bits cannot hold the sum)
        assert not any(isinstance(m, NF4Linear) for m in model.modules())
        assert (model(IDS) - adapted).abs().max() < 1e-5
        model.unmerge_adapter()
        assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 2 * 7
        assert buffers.keys() == dict(model.named_buffers()).keys()
        assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
        assert torch.equal(model(IDS), adapted)


def test_qlora_trains_under_bf16_autocast_as_in_fp32():
    """Under ``torch.autocast`` (bf16), the NF4 base de-quantizes and multiplies in bf16 and the
    LoRA path follows: loss within 1% and each adapter gradient within 10% of its norm of the
    same step in fp32 (HF PEFT's QLoRA needs bitsandbytes, which has no CPU build here, so fp32
    is the reference and the whole of bf16's rounding shows: measured 1.3e-4 and 6.3%); gradients
    stay fp32 and reach only the adapters."""
    def loss_and_grads(autocast):
        torch.manual_seed(4)
        model = get_peft_model(quantize_nf4(_model()), LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
        return loss_and_grads_under_autocast(model, IDS, enabled=autocast)

    want_loss, want = loss_and_grads(False)
    loss, got = loss_and_grads(True)
    assert loss != want_loss and abs(loss - want_loss) < 1e-2 * abs(want_loss)  # bf16 did run
    assert sorted(got) == sorted(want) and all("lora_" in n for n in got) and len(got) == 2 * 7 * 2
    for name, g in got.items():
        assert g.dtype == torch.float32, name
        assert (g - want[name]).norm() <= 0.10 * want[name].norm(), name
