"""Sparse mixture-of-experts feed-forward: Mixtral's, Qwen3-MoE's and DeepSeekMoE's (each
family's checkpoint names: ``block_sparse_moe.experts.0.w1`` for Mixtral, ``mlp.experts.0.gate_proj``
for Qwen3-MoE and DeepSeek, whose layers add ``mlp.shared_experts``: a dense gated MLP every token
runs through, and whose V3 router holds ``mlp.gate.e_score_correction_bias``). How the experts are
chosen and weighed is ``mlx_core.models.moe_routing``'s strategy for the config.

Each expert keeps its own ``nn.Linear`` layers, so checkpoints, PEFT adapters and the transforms
that swap linear layers (quantization, GGUF blocks, prepacked weights, multi-LoRA serving) see
the experts as they see any MLP. The forward routes each token to its top-k experts, sorts the
(token, slot) pairs by expert and runs the experts as grouped matmuls
(``mlx_kernels.moe_grouped_matmul``) over the stacked expert weights, with no host sync: one
graph for ``torch.compile``. Experts whose layers are not plain linear layers (quantized,
wrapped by an adapter) run one by one on their rows instead, after one host read of the row
counts per layer; under ``torch.compile`` each of those runs over every row and each row keeps
its own expert's output (shape-static; the decode step's few rows).

The stacked weights are made once (by the first inference call, and again after the parameters
are replaced: ``.to()``, ``load_state_dict(assign=True)``, a new tensor) and then ARE the experts'
storage: each expert's parameters are re-pointed at their slice of the stack, so there is no
second copy, and in-place updates (``load_state_dict``, an optimizer step, a merged adapter) show
in both. Under autograd the stack is built from the parameters at each call (``torch.stack``),
so each expert's parameters get their own gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from mlx_core.config import ModelConfig
from mlx_core.models.linear import Linear
from mlx_core.models.moe_routing import Routing
from mlx_kernels import moe_grouped_matmul, swiglu
from mlx_kernels.dispatch import records_autograd
from mlx_kernels.moe import row_experts, sort_by_expert

# each expert's gate, up and down projections, as the family's checkpoints name them
EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}
_LLAMA_NAMES = ("gate_proj", "up_proj", "down_proj")


def moe_attribute(config: ModelConfig) -> str:
    """The decoder layer's name for its MoE feed-forward (as the family's checkpoints have it)."""
    return "block_sparse_moe" if config.model_type == "mixtral" else "mlp"


class Expert(nn.Module):
    """One gated-SiLU expert: ``down(silu(gate x) * up x)``, its layers named as ``names``
    (gate, up, down)."""

    def __init__(self, hidden: int, intermediate: int, names: tuple[str, str, str] = _LLAMA_NAMES):
        super().__init__()
        self.names = names
        gate, up, down = names
        setattr(self, gate, Linear(hidden, intermediate, bias=False))
        setattr(self, up, Linear(hidden, intermediate, bias=False))
        setattr(self, down, Linear(intermediate, hidden, bias=False))

    def projections(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return tuple(getattr(self, name) for name in self.names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.projections()
        return down(swiglu(gate(x), up(x)))


class _Stacks:
    """The stacked expert weights ``(gate_up [E, 2I, H], down [E, H, I])`` and the data
    pointers of the parameters they were made from. Not part of the module's state: a copied
    or pickled model stacks its own on first use."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.tensors, self.pointers = None, None

    def __deepcopy__(self, memo):
        return _Stacks()

    def __getstate__(self):
        return {"tensors": None, "pointers": None}


class Router(Linear):
    """The router's linear layer (``mlp.gate``), with DeepSeek-V3's per-expert bias on the scores
    that choose the experts (a buffer, as HF has it: loaded and saved, never trained here)."""

    def __init__(self, hidden: int, num_experts: int, correction_bias: bool = False):
        super().__init__(hidden, num_experts, bias=False)
        self.register_buffer("e_score_correction_bias",
                             torch.zeros(num_experts) if correction_bias else None)


class SparseMoE(nn.Module):
    """Top-k routing (``moe_routing.Routing``: Mixtral's softmax top-k, DeepSeek's grouped and
    biased forms), then a weighted sum of the chosen experts' outputs, plus the shared experts'
    output where the config has them (DeepSeekMoE's ``n_shared_experts``)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.routing = Routing.from_config(config)
        self.top_k = config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob
        self.gate = Router(config.hidden_size, config.num_experts,
                           correction_bias=self.routing.uses_correction_bias)
        names = EXPERT_NAMES.get(config.model_type, _LLAMA_NAMES)
        self.experts = nn.ModuleList(
            Expert(config.hidden_size, config.expert_intermediate_size, names)
            for _ in range(config.num_experts)
        )
        if config.n_shared_experts:
            self.shared_experts = Expert(config.hidden_size,
                                         config.expert_intermediate_size * config.n_shared_experts)
        self._stacks = _Stacks()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, chosen = self.routing(self.gate(flat), self._correction_bias())  # [N, k] each
        order, offsets = sort_by_expert(chosen, len(self.experts))
        rows = flat[order // self.top_k]  # row i: the token of pair order[i], grouped by expert
        stacked = self._stacked_weights()
        if stacked is None:
            out = self._one_by_one(rows, offsets)
        else:
            gate_up, down = stacked
            gate, up = moe_grouped_matmul(rows, gate_up, offsets).chunk(2, dim=-1)
            out = moe_grouped_matmul(swiglu(gate, up), down, offsets)
        out = torch.zeros_like(out).index_copy(0, order, out)  # back in (token, slot) order
        combined = (out.view(-1, self.top_k, shape[-1]) * weights[..., None]).sum(dim=1)
        combined = combined.to(x.dtype).reshape(shape)
        if hasattr(self, "shared_experts"):
            combined = combined + self.shared_experts(x)
        return combined

    def _correction_bias(self) -> torch.Tensor | None:
        if not self.routing.uses_correction_bias:
            return None
        bias = getattr(self.gate, "e_score_correction_bias", None)
        if bias is None:
            raise RuntimeError(f"this MoE routes with {self.routing.topk_method} but its router "
                               f"({type(self.gate).__name__}) has no e_score_correction_bias: a "
                               "transform replaced the router layer; leave mlp.gate as it is")
        return bias

    def _one_by_one(self, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Each expert module on its rows: any layers (quantized, adapter-wrapped)."""
        if torch.compiler.is_compiling():
            row_expert = row_experts(offsets, rows.shape[0])
            out = self.experts[0](rows)
            for e in range(1, len(self.experts)):
                out = torch.where((row_expert == e)[:, None], self.experts[e](rows), out)
            return out
        bounds = offsets.tolist()  # one host read per layer
        parts = [expert(rows[bounds[e]:bounds[e + 1]]) for e, expert in enumerate(self.experts)
                 if bounds[e + 1] > bounds[e]]
        return torch.cat(parts) if parts else rows

    def _stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(gate_up [E, 2I, H], down [E, H, I])``, or None when an expert's layers are not
        plain bias-free linear layers."""
        layers = [expert.projections() for expert in self.experts]
        if not all(isinstance(layer, nn.Linear) and layer.bias is None
                   for group in layers for layer in group):
            self._stacks.clear()  # a transform swapped the layers: let the old stack go
            return None
        if records_autograd(*(layer.weight for group in layers for layer in group)):
            return _stack(layers)  # autograd reaches each expert's own parameters
        if torch.compiler.is_compiling() and self._stacks.tensors is not None:
            return self._stacks.tensors  # stacked by the eager calls before compiling
        if torch.compiler.is_compiling():
            return _stack(layers)
        pointers = [layer.weight.data_ptr() for group in layers for layer in group]
        if self._stacks.pointers != pointers:
            made_in_inference = {layer.weight.is_inference() for group in layers for layer in group}
            if len(made_in_inference) > 1:  # a parameter's storage cannot change kind
                self._stacks.clear()
                return _stack(layers)
            self._restack(layers, made_in_inference.pop())
        return self._stacks.tensors

    def _restack(self, layers, inference: bool) -> None:
        # tensors of the parameters' kind: plain ones unless they were made in inference mode
        with torch.no_grad(), torch.inference_mode(inference):
            gate_up, down = _stack(layers)
            inter = gate_up.shape[1] // 2
            for e, (gate, up, proj_down) in enumerate(layers):
                gate.weight.data, up.weight.data = gate_up[e, :inter], gate_up[e, inter:]
                proj_down.weight.data = down[e]
        self._stacks.tensors = (gate_up, down)
        self._stacks.pointers = [layer.weight.data_ptr() for group in layers for layer in group]

    def _apply(self, fn, recurse=True):  # .to(), .half(), ...: new parameter tensors
        self._stacks.clear()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):  # assign=True may replace the parameters
        self._stacks.clear()
        super()._load_from_state_dict(*args, **kwargs)


def _stack(layers) -> tuple[torch.Tensor, torch.Tensor]:
    gate_up = torch.stack([torch.cat([gate.weight, up.weight]) for gate, up, _ in layers])
    return gate_up, torch.stack([down.weight for *_, down in layers])
