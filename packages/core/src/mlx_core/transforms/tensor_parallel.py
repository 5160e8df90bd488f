"""Tensor parallelism (Megatron's layout, as vLLM runs it): one model's layers split across the
ranks of a ``torch.distributed`` process group, each rank holding and computing its share.

``shard_model(model, rank, world_size, group)`` cuts a loaded zoo model in place; every rank
runs the same forward on the same inputs and gets the same output:

- attention: q/k/v are column-parallel (each rank its heads: whole GQA groups when there are at
  least as many KV heads as ranks, unevenly where they do not divide, e.g. SmolLM2's 3 KV heads
  on 2 ranks as 2 + 1; otherwise each rank the query heads of one KV head, which ranks then
  hold alike), o_proj is row-parallel: the partial outputs are summed by one all-reduce. The
  KV cache holds each rank's KV heads only: the model's config names this rank's head counts,
  so the caches built from it (``KVCache``, the serving engine's paged cache) are this rank's.
  OLMo 2's norm over the whole query/key projection sums its squares across ranks.
- gated and GELU MLPs, MoE experts and DeepSeek's shared experts: gate/up column-parallel,
  down row-parallel, one all-reduce per block (an MoE's router runs whole on every rank).
- multi-head latent attention (DeepSeek): the query and ``kv_b_proj`` heads split, the latent
  computed whole on every rank (it is small), ``o_proj`` row-parallel.
- the embedding and the LM head are vocab-parallel: each rank looks up (scores) its rows of
  the vocabulary; the lookups are summed, the logits gathered, so every rank sees them all.

A row-parallel layer's bias is added once (rank 0's). The all-reduces are forward hooks on the
attention / MLP modules, so transforms that replace their inner layers afterwards
(``fuse_projections``, ``fast_linear``'s, which apply after sharding: the split layers are plain
zoo ``Linear`` layers) keep them. Norms, positions and routers are replicated.

Quantized models (int8, int4, W8A8, and the int8/int4 group layouts a GGUF file loads as) are
split after quantization, by slicing codes and scales: every rank holds exactly the whole
model's numbers, so int8 and int4 give the logits of the unsplit quantized model (to fp32
rounding). Row-parallel int4 (and group-scaled int8) layers are cut at group boundaries. W8A8
quantizes each rank's slice of a row-parallel layer's input with that slice's own scale (as
vLLM does), so its logits differ from one rank's by about its own quantization error.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from mlx_core.models.linear import Linear
from mlx_core.models.mla import MultiHeadLatentAttention
from mlx_core.models.moe import Expert, SparseMoE
from mlx_core.models.transformer import Attention, GatedMLP, GeluMLP, RMSNorm
from mlx_core.transforms.quantize import (
    Int4Linear,
    Int8Linear,
    QuantizedEmbedding,
    QuantizedLinear,
)
from mlx_core.transforms.shm_collectives import ShmExchange

# the layers shard_model cuts (W8A8Linear is an Int8Linear; Router, a MoE's, and FastLinear
# are the zoo's Linear)
_SPLITTABLE = (nn.Linear, Int8Linear, Int4Linear)


@dataclass
class CollectiveTime:
    """Wall time spent in this rank's collectives, and how many ran (``mlx bench serve``
    reports it per step). On GPU it counts the launch only, as NCCL runs asynchronously."""

    seconds: float = 0.0
    calls: int = 0


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in the tensor-parallel group (``model.tensor_parallel``)."""

    rank: int
    world_size: int
    group: object = None  # a torch.distributed ProcessGroup; None: the default group
    time: CollectiveTime = field(default_factory=CollectiveTime, compare=False)
    # each cut layer's share, by its zoo name: ("out" or "in", lo, hi), the output rows
    # (column-parallel) or input columns (row-parallel) it holds; what a LoRA adapter's
    # matrices are cut by (mlx_serve.lora)
    shares: dict = field(default_factory=dict, compare=False)
    # ranks that are processes of one CPU machine: collectives through shared memory
    # (shm_collectives), torch.distributed for what does not fit its buffer
    shm: ShmExchange | None = field(default=None, compare=False)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        started = time.perf_counter()
        if self.shm is not None and self.shm.fits(x):
            x = self.shm.all_reduce(x)
        else:
            dist.all_reduce(x, group=self.group)
        self._count(started)
        return x

    def _count(self, started: float) -> None:
        self.time.seconds += time.perf_counter() - started
        self.time.calls += 1

    def gather_last_dim(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Every rank's ``x`` (its ``sizes[rank]`` columns of the last dim) side by side; the
        shares may differ in size (gloo gathers equal shapes: padded, then cut)."""
        widest = max(sizes)
        padded = torch.nn.functional.pad(x.contiguous(), (0, widest - x.shape[-1]))
        started = time.perf_counter()
        if self.shm is not None and self.shm.fits(padded):
            parts = self.shm.exchange(padded).to(padded.dtype).unbind(0)
        else:
            parts = [torch.empty_like(padded) for _ in range(self.world_size)]
            dist.all_gather(parts, padded, group=self.group)
        self._count(started)
        return torch.cat([p[..., :n] for p, n in zip(parts, sizes, strict=True)], dim=-1)


def even_split(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[lo, hi)`` of ``rank``'s share of ``total`` items: the first ``total % world_size``
    ranks take one more."""
    base, extra = divmod(total, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def head_ranges(num_heads: int, num_kv_heads: int, world_size: int, rank: int
                ) -> tuple[tuple[int, int], tuple[int, int]]:
    """``rank``'s query heads and KV heads, ``([q_lo, q_hi), [kv_lo, kv_hi))``."""
    group = num_heads // num_kv_heads
    if num_kv_heads >= world_size:  # whole GQA groups
        kv_lo, kv_hi = even_split(num_kv_heads, world_size, rank)
        return (kv_lo * group, kv_hi * group), (kv_lo, kv_hi)
    if world_size > num_heads:
        raise ValueError(f"tensor_parallel_size={world_size} is more than this model's "
                         f"{num_heads} attention heads: use at most {num_heads} ranks")
    q_lo, q_hi = even_split(num_heads, world_size, rank)
    kv_lo, kv_hi = q_lo // group, (q_hi - 1) // group + 1
    if kv_hi - kv_lo != 1:
        raise ValueError(
            f"tensor_parallel_size={world_size} does not split this model's {num_heads} query "
            f"heads over its {num_kv_heads} KV heads evenly (a rank would hold query heads of two "
            f"KV heads in unequal numbers): use a size that divides {num_kv_heads}, or a "
            f"multiple of {num_kv_heads} that divides {num_heads}")
    return (q_lo, q_hi), (kv_lo, kv_hi)


def shard_model(model: nn.Module, rank: int, world_size: int, group=None,
                shm: ShmExchange | None = None) -> nn.Module:
    """Cut ``model`` (a zoo ``Transformer``, unfused) to ``rank``'s share of a
    ``world_size``-way tensor-parallel group, in place (see the module docstring). Every rank
    calls it on the same model; ``torch.distributed`` must be initialised before it runs.
    ``shm``: the ranks' shared-memory exchange when they all run on this machine's CPU."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of tensor_parallel_size={world_size} is out of range")
    if getattr(model, "tensor_parallel", None) is not None:
        raise ValueError("this model is sharded already (model.tensor_parallel is set)")
    _check_shardable(model)
    parallel = TensorParallel(rank, world_size, group,
                              shm=None if shm is None else shm.bind(rank))
    config = model.config
    local_heads = None
    with torch.no_grad():
        for module in list(model.modules()):
            if isinstance(module, Attention):
                local_heads = _shard_attention(module, config, parallel)
            elif isinstance(module, MultiHeadLatentAttention):
                local_heads = _shard_latent_attention(module, parallel)
            elif isinstance(module, (GatedMLP, Expert)):
                gate, up, down = (("gate_proj", "up_proj", "down_proj")
                                  if isinstance(module, GatedMLP) else module.names)
                lo, hi = even_split(getattr(module, gate).out_features, world_size, rank)
                for name in (gate, up):
                    setattr(module, name, _rows(getattr(module, name), lo, hi))
                setattr(module, down, _columns(getattr(module, down), lo, hi, parallel))
            elif isinstance(module, GeluMLP):
                lo, hi = even_split(module.up_proj.out_features, world_size, rank)
                module.up_proj = _rows(module.up_proj, lo, hi)
                module.down_proj = _columns(module.down_proj, lo, hi, parallel)
            else:
                continue
            # an expert's output is summed once, with the others', at its SparseMoE
            if not isinstance(module, Expert):
                module.register_forward_hook(_summed_over_ranks(parallel))
        for module in model.modules():
            if isinstance(module, SparseMoE):
                module.register_forward_hook(_summed_over_ranks(parallel))
        _shard_vocabulary(model, parallel)
    parallel.shares.update({name: module.tensor_parallel_share
                            for name, module in model.named_modules()
                            if hasattr(module, "tensor_parallel_share")})
    if local_heads is not None:
        heads, kv_heads = local_heads
        local = dataclasses.replace(config, num_heads=heads, num_kv_heads=kv_heads,
                                    head_dim=config.dim_per_head)
        model.config = model.model.config = local
    model.tensor_parallel = parallel
    return model


def _check_shardable(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if type(module).__name__.startswith("Fused"):
            raise ValueError(f"{name} is fused (fuse_projections): shard the model first, then "
                             "fuse its projections")
        if isinstance(module, (nn.Linear, QuantizedLinear)) and not isinstance(module, _SPLITTABLE):
            raise ValueError(
                f"{name} is a {type(module).__name__}: tensor parallelism splits full-precision, "
                "int8, W8A8 and int4 linear layers only: load the model in full precision, or "
                "quantize it with mlx_core.transforms.quantize")


def _shard_attention(attention: Attention, config, parallel: TensorParallel) -> tuple[int, int]:
    d = attention.head_dim
    (q_lo, q_hi), (kv_lo, kv_hi) = head_ranges(attention.num_heads, attention.num_kv_heads,
                                               parallel.world_size, parallel.rank)
    if attention.qk_norm == "projection":
        if attention.num_kv_heads < parallel.world_size:
            raise ValueError(
                f"{config.model_type} normalises the whole key projection; with fewer KV heads "
                f"({attention.num_kv_heads}) than ranks ({parallel.world_size}) ranks would "
                "hold KV heads alike and count them twice: use a tensor_parallel_size of at "
                f"most {attention.num_kv_heads}")
        attention.q_norm = _ShardedRMSNorm(attention.q_norm, q_lo * d, q_hi * d, parallel)
        attention.k_norm = _ShardedRMSNorm(attention.k_norm, kv_lo * d, kv_hi * d, parallel)
    attention.q_proj = _rows(attention.q_proj, q_lo * d, q_hi * d)
    attention.k_proj = _rows(attention.k_proj, kv_lo * d, kv_hi * d)
    attention.v_proj = _rows(attention.v_proj, kv_lo * d, kv_hi * d)
    attention.o_proj = _columns(attention.o_proj, q_lo * d, q_hi * d, parallel)
    attention.num_heads, attention.num_kv_heads = q_hi - q_lo, kv_hi - kv_lo
    return attention.num_heads, attention.num_kv_heads


def _shard_latent_attention(attention: MultiHeadLatentAttention, parallel: TensorParallel
                            ) -> tuple[int, int]:
    lo, hi = even_split(attention.num_heads, parallel.world_size, parallel.rank)
    per_q = attention.nope_dim + attention.rope_dim
    per_kv = attention.nope_dim + attention.v_dim
    if attention.q_lora_rank is None:
        attention.q_proj = _rows(attention.q_proj, lo * per_q, hi * per_q)
    else:
        attention.q_b_proj = _rows(attention.q_b_proj, lo * per_q, hi * per_q)
    attention.kv_b_proj = _rows(attention.kv_b_proj, lo * per_kv, hi * per_kv)
    attention.o_proj = _columns(attention.o_proj, lo * attention.v_dim, hi * attention.v_dim,
                                parallel)
    attention.num_heads = hi - lo
    return attention.num_heads, attention.num_heads


def _rows(layer: nn.Module, lo: int, hi: int) -> nn.Module:
    out = _cut_rows(layer, lo, hi)
    out.tensor_parallel_share = ("out", lo, hi)
    return out


def _columns(layer: nn.Module, lo: int, hi: int, parallel: TensorParallel) -> nn.Module:
    out = _cut_columns(layer, lo, hi, parallel)
    out.tensor_parallel_share = ("in", lo, hi)
    return out


def _cut_rows(layer: nn.Module, lo: int, hi: int) -> nn.Module:
    """Column-parallel: the output features ``[lo, hi)``. A full-precision layer becomes a zoo
    ``Linear`` (a prepacked weight or output layout, ``fast_linear``'s, is the whole layer's:
    apply it again after); a quantized one keeps its codes and scales of those rows."""
    bias = None if layer.bias is None else layer.bias[lo:hi].clone()
    if isinstance(layer, QuantizedLinear):
        names = ("qweight", "scales", "mins") if isinstance(layer, Int4Linear) else ("qweight", "scale")
        tensors = [getattr(layer, n)[lo:hi].clone() for n in names]
        return type(layer)(*tensors, bias).computing_in(layer.compute_dtype)
    out = Linear(layer.in_features, hi - lo, bias=bias is not None, device="meta")
    out.weight = nn.Parameter(layer.weight[lo:hi].clone(), requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias, requires_grad=False)
    return out


def _cut_columns(layer: nn.Module, lo: int, hi: int, parallel: TensorParallel) -> nn.Module:
    """Row-parallel: the input features ``[lo, hi)``; the bias on rank 0 only (added once when
    the partial outputs are summed). Per-row scales stay whole (each rank's partial sum is
    scaled as the whole row is); groups of scales (int4, GGUF int8) must not straddle the cut."""
    bias = None if layer.bias is None else (
        layer.bias.detach().clone() if parallel.rank == 0 else torch.zeros_like(layer.bias))
    if isinstance(layer, QuantizedLinear):
        int4 = isinstance(layer, Int4Linear)
        grouped = layer.scales if int4 else layer.scale if layer.scale.dim() == 2 else None
        q = layer.qweight[:, lo // 2:hi // 2] if int4 else layer.qweight[:, lo:hi]
        if grouped is None:  # one scale per row
            return type(layer)(q.contiguous(), layer.scale.clone(), bias).computing_in(
                layer.compute_dtype)
        group = layer.in_features // grouped.shape[1]
        if lo % group or hi % group:
            raise ValueError(
                f"a {type(layer).__name__} with groups of {group} inputs cannot be cut at input "
                f"features {lo}:{hi} for rank {parallel.rank}: use a tensor_parallel_size that "
                f"splits its {layer.in_features} inputs into whole groups, or a smaller group")
        scales = [t[:, lo // group:hi // group].contiguous()
                  for t in ((layer.scales, layer.mins) if int4 else (layer.scale,))]
        return type(layer)(q.contiguous(), *scales, bias).computing_in(layer.compute_dtype)
    out = Linear(hi - lo, layer.out_features, bias=bias is not None, device="meta")
    out.weight = nn.Parameter(layer.weight[:, lo:hi].clone(), requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias, requires_grad=False)
    return out


def _summed_over_ranks(parallel: TensorParallel):
    def hook(module, args, output):
        return parallel.all_reduce(output)
    return hook


class _ShardedRMSNorm(nn.Module):
    """An RMS norm over a whole projection of which this rank holds features ``[lo, hi)``: the
    squares summed across ranks, then this rank's features scaled by its slice of the weight."""

    def __init__(self, norm: RMSNorm, lo: int, hi: int, parallel: TensorParallel):
        super().__init__()
        self.weight = nn.Parameter(norm.weight[lo:hi].clone(), requires_grad=False)
        self.eps, self.offset, self.size = norm.eps, norm.offset, norm.weight.numel()
        self.parallel = parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squares = self.parallel.all_reduce(x.float().pow(2).sum(-1, keepdim=True))
        normed = x.float() * torch.rsqrt(squares / self.size + self.eps)
        return (self.weight.float() + self.offset) * normed.to(x.dtype) if self.offset \
            else self.weight * normed.to(x.dtype)


class VocabParallelEmbedding(nn.Module):
    """This rank's rows ``[lo, hi)`` of the embedding table (``rows``: an ``nn.Embedding``, or
    a ``QuantizedEmbedding``): ids outside them look up zeros, and the ranks' lookups summed
    give every id its row (times Gemma's multiplier)."""

    def __init__(self, rows: nn.Module, lo: int, hi: int, vocab_size: int,
                 multiplier: float | None, parallel: TensorParallel):
        super().__init__()
        self.rows, self.lo, self.hi, self.parallel = rows, lo, hi, parallel
        self.num_embeddings, self.embedding_dim = vocab_size, rows.embedding_dim
        self.multiplier = multiplier

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mine = (input_ids >= self.lo) & (input_ids < self.hi)
        out = self.rows(torch.where(mine, input_ids - self.lo, 0))
        out = self.parallel.all_reduce(out * mine[..., None].to(out.dtype))
        if self.multiplier is not None:
            out = out * torch.tensor(self.multiplier, dtype=out.dtype)
        return out


class VocabParallelHead(nn.Module):
    """The LM head's rows of this rank's share of the vocabulary (``layer``: any linear
    layer); each rank scores its share, and the shares are gathered so that every rank
    returns the whole vocabulary's logits."""

    def __init__(self, layer: nn.Module, shares: list[int], parallel: TensorParallel):
        super().__init__()
        self.layer, self.shares, self.parallel = layer, shares, parallel
        self.in_features, self.out_features = layer.in_features, sum(shares)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parallel.gather_last_dim(self.layer(x), self.shares)


def _shard_vocabulary(model: nn.Module, parallel: TensorParallel) -> None:
    embedding, head = model.model.embed_tokens, model.lm_head
    if not isinstance(embedding, (nn.Embedding, QuantizedEmbedding)):
        raise ValueError(f"the embedding is a {type(embedding).__name__}: tensor parallelism "
                         "splits full-precision and int8/int4 tables only")
    vocab = embedding.num_embeddings
    spans = [even_split(vocab, parallel.world_size, r) for r in range(parallel.world_size)]
    lo, hi = spans[parallel.rank]
    multiplier = getattr(embedding, "multiplier", None)
    if isinstance(embedding, QuantizedEmbedding):
        tied = getattr(head, "qweight", None) is embedding.qweight
        names = ("qweight", "scales", "mins") if embedding.int4 else ("qweight", "scale")
        sliced = {n: getattr(embedding, n)[lo:hi].clone() for n in names}
        rows = QuantizedEmbedding(sliced.pop("qweight"), **sliced, dtype=embedding.dtype)
        own_head = rows.as_linear(head.scheme, head.bias).computing_in(head.compute_dtype) \
            if tied else _rows(head, lo, hi)
    else:
        tied = head.weight is embedding.weight
        rows = nn.Embedding(hi - lo, embedding.embedding_dim, device="meta")
        rows.weight = nn.Parameter(embedding.weight[lo:hi].clone(), requires_grad=False)
        own_head = _rows(head, lo, hi)
        if tied:
            own_head.weight = rows.weight
    model.model.embed_tokens = VocabParallelEmbedding(rows, lo, hi, vocab, multiplier, parallel)
    model.lm_head = VocabParallelHead(own_head, [b - a for a, b in spans], parallel)


__all__ = ["CollectiveTime", "TensorParallel", "VocabParallelEmbedding", "VocabParallelHead", "even_split",
           "head_ranges", "shard_model"]
