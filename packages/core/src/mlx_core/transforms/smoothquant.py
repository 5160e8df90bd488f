"""SmoothQuant (Xiao et al., 2023): make activations easier to quantize per token before W8A8.

A few input channels of a decoder's linears carry activations far larger than the rest, and a
per-token int8 scale set by them leaves the others a handful of steps. For each channel ``j`` of
a linear group's input, ``s_j = max|X_j|^alpha / max|W_{:,j}|^(1 - alpha)`` (the activation
maximum over calibration tokens): the input is divided by ``s`` where it is produced (the
norm's weight and bias before q/k/v and gate/up; the up projection's rows before down, since
``silu(gate) * up`` is linear in ``up``) and the weights' columns multiplied by it. The fp32
model computes the same function (up to rounding); only the ranges move from activations to
weights. o_proj is left alone (its input comes from attention over value heads).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# the best of 0.3 / 0.5 / 0.65 / 0.8 on the built-in model (mlx bench quant's perplexity: plain
# W8A8 +7.7%; smoothed +8.0 / +4.1 / +1.8 / +2.3%); the paper's default is 0.5
DEFAULT_ALPHA = 0.65
CALIBRATION_TEXT = "calibration_english.txt"


def calibration_text() -> str:
    """A short public-domain English text (and a little code) the package ships for
    calibration, disjoint from the text ``mlx bench quant`` measures perplexity on."""
    from pathlib import Path

    return (Path(__file__).resolve().parents[1] / "data" / CALIBRATION_TEXT).read_text()


def default_calibration(tokenizer, length: int = 128) -> list[list[int]]:
    """The shipped calibration text as ``length``-token sequences of ``tokenizer``'s ids."""
    ids = tokenizer.encode(calibration_text())
    return [ids[i:i + length] for i in range(0, len(ids), length) if len(ids[i:i + length]) > 1]


@torch.no_grad()
def activation_maxima(model: nn.Module, calibration: Sequence[Sequence[int]],
                      layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``max |x|`` per input channel of each named layer over the calibration sequences."""
    maxima: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(dim=0).float()
            maxima[name] = torch.maximum(maxima[name], x) if name in maxima else x
        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        for ids in calibration:
            model(torch.tensor([list(ids)], device=model.device))
    finally:
        for handle in handles:
            handle.remove()
    return maxima


def _scales(x_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_max = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0).float()
    s = x_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


@torch.no_grad()
def smooth(model: nn.Module, calibration: Sequence[Sequence[int]], alpha: float = DEFAULT_ALPHA) -> int:
    """Apply SmoothQuant's scales to ``model`` (the zoo ``Transformer``, full precision) in place;
    returns the number of linear groups smoothed."""
    from mlx_core.models.transformer import GatedMLP, GeluMLP

    if not 0 < alpha < 1:
        raise ValueError(f"SmoothQuant alpha must be in (0, 1), got {alpha}")
    groups = []  # (producer: norm module or up_proj, linears reading its output, is_norm)
    for layer in model.model.layers:
        attn = layer.self_attn
        mlp = getattr(layer, "mlp", None)  # MoE layers' experts (SparseMoE) are left alone
        # post-norm layers (OLMo 2) read the residual stream itself: no norm to fold scales into
        pre_norm = hasattr(layer, "input_layernorm")
        # the MLP's input norm: Gemma's sandwich layers have one of their own
        mlp_norm = getattr(layer, "pre_feedforward_layernorm", layer.post_attention_layernorm)
        if pre_norm:
            groups.append((layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], True))
        if isinstance(mlp, GatedMLP):
            if pre_norm:
                groups.append((mlp_norm, [mlp.gate_proj, mlp.up_proj], True))
            groups.append((mlp.up_proj, [mlp.down_proj], False))
        elif isinstance(mlp, GeluMLP) and pre_norm:
            groups.append((mlp_norm, [mlp.up_proj], True))
    readers = {f"g{i}": linears[0] for i, (_, linears, _) in enumerate(groups)}
    maxima = activation_maxima(model, calibration, readers)
    for i, (producer, linears, is_norm) in enumerate(groups):
        s = _scales(maxima[f"g{i}"], [lin.weight for lin in linears], alpha)
        for lin in linears:
            lin.weight.mul_(s.to(lin.weight.dtype))
        if is_norm:
            # the norm scales by (offset + weight) (Gemma: 1 + weight): divide that
            offset = getattr(producer, "offset", 0.0)
            producer.weight.copy_((producer.weight + offset) / s.to(producer.weight.dtype) - offset)
            if getattr(producer, "bias", None) is not None:
                producer.bias.div_(s.to(producer.bias.dtype))
        else:  # up_proj's output channel j feeds down_proj's input j (times silu(gate_j))
            producer.weight.div_(s.to(producer.weight.dtype)[:, None])
            if producer.bias is not None:
                producer.bias.div_(s.to(producer.bias.dtype))
    return len(groups)
