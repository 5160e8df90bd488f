"""FSDP2 for the full-weight recipes (``train.strategy=fsdp`` under ``torchrun``).

``shard_model`` applies ``torch.distributed.fsdp.fully_shard`` to every decoder layer and then
to the root (embeddings, final norm, head), as torchtune's distributed recipes do: each
process holds ``1/W`` of every weight and of the optimizer state, and the layers' weights are
gathered just in time for their forward and backward. Gradients are reduce-scattered and
averaged over the processes, as DDP averages them, so the recipes' loss weighting
(``mlx_train.runner.scaleout``) gives the same steps as one process.

Checkpoints (``checkpoints/last.safetensors``) hold whole tensors (``mlx_train.state``
gathers them), so a run resumes with any number of processes. ``save_full_model`` writes the
HF-format model from the sharded weights: ``get_model_state_dict(full_state_dict=True,
cpu_offload=True)`` gathers them on rank 0, which writes.

Works on CPU with gloo (torch >= 2.6) and on CUDA with nccl.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from mlx_train.distributed import is_main_process, world_info
from mlx_train.runner.scaleout import barrier, distributed, strategy


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder layers: ``model.model.layers`` in the zoo (and HF's Llama family),
    else the longest ``nn.ModuleList`` in the model."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"train.strategy=fsdp: {type(model).__name__} has no nn.ModuleList of "
                         "decoder layers to shard; use train.strategy=ddp")
    return max(lists, key=len)


def shard_model(cfg: DictConfig, model: nn.Module) -> nn.Module:
    """``model`` sharded with FSDP2 when ``train.strategy=fsdp`` and several processes run;
    otherwise ``model`` as it is (one process has nothing to shard)."""
    if strategy(cfg) != "fsdp" or not distributed():
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _, world, local = world_info()
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    mesh = init_device_mesh(device.type, (world,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root: embeddings, final norm, head (tied or not)
    return model


def full_model(model: nn.Module) -> nn.Module | None:
    """On rank 0, a plain (unsharded, CPU) copy of a sharded zoo ``model``; ``None`` on the
    other processes. Every process must call it (the gather is a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    if not is_main_process():
        return None
    from mlx_core import build_model

    dtype = next(iter(state.values())).dtype
    plain = build_model(model.config, dtype=dtype, device="meta", init=False)
    plain.load_state_dict(state, strict=False, assign=True)
    for name, buf in model.named_buffers():  # buffers are not sharded; some are not in `state`
        owner, _, leaf = name.rpartition(".")
        plain.get_submodule(owner)._buffers[leaf] = buf.detach().cpu().clone()
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()
    left = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"the gathered state dict lacks {left[:5]}: cannot rebuild the model")
    if hasattr(model, "source_dir"):
        plain.source_dir = model.source_dir
    return plain


def on_rank0(model: nn.Module, fn):
    """``fn(model)`` run by rank 0 alone, its result sent to every process (with one process:
    just ``fn(model)``). Generation goes this way: a sharded model is gathered into a plain
    copy first, because FSDP2's gathered weights cannot be used in ``inference_mode`` (they
    become inference tensors that the next training step may not write), and one process
    generating beats every process gathering weights for each new token."""
    if not distributed():
        return fn(model)
    import torch.distributed as dist

    plain = full_model(model) if is_sharded(model) else (model if is_main_process() else None)
    box = [fn(plain) if plain is not None else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_full_model(model: nn.Module, directory: Path, tokenizer=None) -> Path:
    """``mlx_core.save_model`` from rank 0, gathering a sharded model's weights first; every
    process returns once the directory is written."""
    from mlx_core import save_model

    plain = full_model(model) if is_sharded(model) else (model if is_main_process() else None)
    if plain is not None:
        save_model(plain, directory, tokenizer=tokenizer, overwrite=True)
    barrier()
    return Path(directory)


__all__ = ["decoder_layers", "full_model", "is_sharded", "on_rank0", "save_full_model",
           "shard_model"]
