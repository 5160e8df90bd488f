"""Sharding over a ``jax.sharding.Mesh`` with logical axis names.

Every parameter's dimensions have logical names, given by one table keyed by the zoo's parameter
names (``q_proj.weight [heads, embed]``, ``down_proj.weight [embed, mlp]``, ...); activations
have them too (hidden states ``[batch, length, embed]``, logits ``[batch, length, vocab]``).
Rules map logical names to mesh axes. The default rules are data parallelism over ``data``
(the batch) and Megatron-style tensor parallelism over ``model`` (attention heads, MLP
columns, vocabulary); ``FSDP_RULES`` also shard the hidden dimension of every weight over
``data``. A dimension a mesh axis does not divide stays whole (replicated), so any mesh shape
works for any model; jit inserts the collectives, and the numbers equal the unsharded ones up
to float summation order.

    mesh = make_mesh(data=2, model=4)
    sharder = Sharder(mesh)
    sharder.shard_model(model)                   # parameters placed, activations constrained
    logits = forward(model, sharder.shard_batch(ids))
    losses = train(model, batches, steps, lr, sharder=sharder)
"""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mlx_jax.loading import param_name
from mlx_jax.transformer import HIDDEN_AXES, LOGITS_AXES

# logical axis -> mesh axis (None: replicated)
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"), ("length", None), ("embed", None), ("vocab", "model"), ("heads", "model"),
    ("kv_heads", "model"), ("mlp", "model"), ("experts", None), ("positions", None),
    ("rank", None),
)
FSDP_RULES = tuple((name, "data" if name == "embed" else axis) for name, axis in DEFAULT_RULES)

# The zoo's parameter names (last parts) -> the logical names of their dimensions.
PARAM_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"embed_tokens\.weight", ("vocab", "embed")),
    (r"embed_positions\.weight", ("positions", "embed")),
    (r"lm_head\.weight", ("vocab", "embed")),
    (r"q_proj\.weight", ("heads", "embed")),
    (r"q_proj\.bias", ("heads",)),
    (r"[kv]_proj\.weight", ("kv_heads", "embed")),
    (r"[kv]_proj\.bias", ("kv_heads",)),
    (r"o_proj\.weight", ("embed", "heads")),
    (r"(gate_proj|up_proj|w1|w3)\.weight", ("mlp", "embed")),
    (r"(gate_proj|up_proj)\.bias", ("mlp",)),
    (r"(down_proj|w2)\.weight", ("embed", "mlp")),
    (r"(block_sparse_moe|mlp)\.gate\.weight", ("experts", "embed")),  # MoE routers
    (r"(o_proj|down_proj)\.bias", ("embed",)),
    (r"(norm|input_layernorm|post_attention_layernorm)\.(weight|bias)", ("embed",)),
)


def param_axes(name: str) -> tuple[str | None, ...]:
    """The logical axes of the parameter called ``name``; a LoRA weight takes its base's:
    ``lora_A [rank, in]``, ``lora_B [out, rank]``."""
    lora = re.fullmatch(r"(.*)\.lora_([AB])\.weight", name)
    if lora:
        out_axis, in_axis = param_axes(lora.group(1) + ".weight")
        return ("rank", in_axis) if lora.group(2) == "A" else (out_axis, "rank")
    for pattern, axes in PARAM_AXES:
        if re.search(rf"(^|\.){pattern}$", name):
            return axes
    raise ValueError(f"no logical axes are known for parameter {name!r}; add its pattern to "
                     "mlx_jax.sharding.PARAM_AXES")


def make_mesh(data: int = -1, model: int = 1, devices=None) -> Mesh:
    """A ``(data, model)`` mesh over ``devices`` (default: all); ``data=-1`` takes the rest."""
    devices = list(jax.devices() if devices is None else devices)
    if data == -1:
        if model < 1 or len(devices) % model:
            raise ValueError(f"model={model} does not divide the {len(devices)} devices")
        data = len(devices) // model
    if data < 1 or model < 1 or data * model > len(devices):
        raise ValueError(f"a {data} x {model} (data x model) mesh needs {data * model} devices; "
                         f"there are {len(devices)} (on CPU, set XLA_FLAGS="
                         "--xla_force_host_platform_device_count=N before importing jax)")
    return Mesh(np.array(devices[:data * model]).reshape(data, model), ("data", "model"))


@dataclasses.dataclass(frozen=True)
class Sharder:
    """Places parameters, optimizer state and batches on ``mesh`` by logical axes, and
    constrains the model's activations. Hashable: the model holds it as a static attribute."""

    mesh: Mesh
    rules: tuple[tuple[str, str | None], ...] = DEFAULT_RULES

    def __post_init__(self):
        object.__setattr__(self, "rules", tuple((str(k), v) for k, v in self.rules))
        missing = sorted({axis for _, axis in self.rules if axis is not None}
                         - set(self.mesh.axis_names))
        if missing:
            raise ValueError(f"the rules map to mesh axes {missing} that the mesh (axes "
                             f"{tuple(self.mesh.axis_names)}) does not have; use "
                             "mlx_jax.sharding.make_mesh(data=..., model=...) or matching rules")

    def spec(self, axes, shape) -> PartitionSpec:
        """The ``PartitionSpec`` of an array with these logical ``axes`` and ``shape``: each
        dimension goes to its rule's mesh axis if that axis divides it and is not used yet."""
        if len(axes) != len(shape):
            raise ValueError(f"logical axes {axes} do not fit an array of shape {tuple(shape)}")
        rules = dict(self.rules)
        used, out = set(), []
        for axis, size in zip(axes, shape, strict=True):
            if axis is not None and axis not in rules:
                raise ValueError(f"no rule for logical axis {axis!r} (rules: {self.rules})")
            mesh_axis = rules.get(axis) if axis is not None else None
            if mesh_axis is None or mesh_axis in used or size % self.mesh.shape[mesh_axis]:
                out.append(None)
            else:
                used.add(mesh_axis)
                out.append(mesh_axis)
        return PartitionSpec(*out)

    def sharding(self, axes, shape) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes, shape))

    def constrain(self, x, axes):
        """``with_sharding_constraint`` of an activation by its logical axes (under jit)."""
        return jax.lax.with_sharding_constraint(x, self.sharding(axes, x.shape))

    def state_shardings(self, state: nnx.State) -> nnx.State:
        """A ``NamedSharding`` for every parameter of an NNX ``State``, by name."""
        return nnx.from_flat_state([
            (path, var.replace(self.sharding(param_axes(param_name(path)), var.get_value().shape)))
            for path, var in nnx.to_flat_state(state)])

    def _put(self, state: nnx.State) -> nnx.State:
        return jax.tree.map(jax.device_put, state, self.state_shardings(state))

    def shard_model(self, model: nnx.Module) -> nnx.Module:
        """Place the model's parameters on the mesh and constrain its activations (in place).
        The model still runs unchanged, under jit, with sharded or unsharded inputs."""
        nnx.update(model, self._put(nnx.state(model)))
        model.model.sharder = self
        return model

    def shard_state(self, state):
        """A ``mlx_jax.training.TrainState`` placed on the mesh: parameters by their axes, the
        optimizer's per-parameter state (Adam's moments) like its parameter, the rest
        replicated. Create the state from a model that went through ``shard_model`` so that its
        activations are constrained too."""
        shardings = self.state_shardings(state.params)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        opt_shardings = optax.tree_map_params(
            state.tx, lambda _, sharding: sharding, state.opt_state, shardings,
            transform_non_params=lambda _: replicated)
        return dataclasses.replace(
            state, params=jax.tree.map(jax.device_put, state.params, shardings),
            frozen=self._put(state.frozen),
            opt_state=jax.tree.map(jax.device_put, state.opt_state, opt_shardings),
            step=jax.device_put(state.step, replicated))

    def shard_batch(self, batch):
        """Split a batch (an array or a dict of ``[B, ...]`` arrays) over the batch axis."""
        def put(x):
            x = np.asarray(x) if not isinstance(x, jax.Array) else x
            return jax.device_put(x, self.sharding(("batch",) + (None,) * (x.ndim - 1), x.shape))

        return {k: put(v) for k, v in batch.items()} if isinstance(batch, dict) else put(batch)


__all__ = ["DEFAULT_RULES", "FSDP_RULES", "HIDDEN_AXES", "LOGITS_AXES", "PARAM_AXES", "Sharder",
           "make_mesh", "param_axes"]
