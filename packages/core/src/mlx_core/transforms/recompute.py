"""Selective recompute as a transform: training keeps less activation memory for a little
elementwise work in backward (Megatron's "selective" recompute; how it works:
``mlx_core.models.recompute``).

``selective_recompute(model)`` swaps the zoo's MLPs and decoder layers for forms that, while a
graph is recorded, keep a recipe instead of three tensors per layer: the MLP's hidden activation
(``[tokens, intermediate]``, the largest of a layer; rebuilt from gate/up, which the activation
keeps anyway) and the two norm outputs the projections read (rebuilt from the norm's input,
which the norm keeps). Gradients are bit for bit those of the plain model; inference, frozen
forwards and layers that ``torch.utils.checkpoint`` recomputes whole take the plain path. The
training recipes, the LM Learner and ``mlx_adapters.get_peft_model`` apply it.
"""

from __future__ import annotations

import torch
from torch import nn

from mlx_core.models.recompute import recompute_when_saved, worth_recomputing
from mlx_core.models.transformer import DecoderLayer, GatedMLP, GeluMLP
from mlx_kernels import gelu_tanh


class RecomputingGatedMLP(GatedMLP):
    def forward(self, x):
        gate, up = self.project(x)
        hidden = self.gated(gate, up)
        if not worth_recomputing(hidden):
            return self.down_proj(hidden)
        with recompute_when_saved(hidden, lambda: self.gated(gate, up)):
            return self.down_proj(hidden)


class RecomputingGeluMLP(GeluMLP):
    def forward(self, x):
        up = self.up_proj(x)
        hidden = gelu_tanh(up)
        if not worth_recomputing(hidden):
            return self.down_proj(hidden)
        with recompute_when_saved(hidden, lambda: gelu_tanh(up)):
            return self.down_proj(hidden)


class RecomputingDecoderLayer(DecoderLayer):
    def normed_into(self, norm: nn.Module, x: torch.Tensor, block) -> torch.Tensor:
        normed = norm(x)
        if not worth_recomputing(normed):
            return block(normed)

        def rebuild():  # the forward exactly as training ran it: the graph-recording path
            with torch.enable_grad():
                return norm(x.detach().requires_grad_()).detach()

        with recompute_when_saved(normed, rebuild):
            return block(normed)


_RECOMPUTING = {GatedMLP: RecomputingGatedMLP, GeluMLP: RecomputingGeluMLP,
                DecoderLayer: RecomputingDecoderLayer}


def selective_recompute(model: nn.Module) -> nn.Module:
    """Give ``model``'s zoo MLPs and decoder layers their recomputing forms, in place (only
    ``forward`` / ``normed_into`` differ; parameters, names and state dict stay); returns it.
    Applying it twice changes nothing. Fused projections (an inference transform) are left."""
    for module in model.modules():
        recomputing = _RECOMPUTING.get(type(module))
        if recomputing is not None:
            module.__class__ = recomputing
    return model

