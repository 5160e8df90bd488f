"""The decode step in fixed shapes, for ``torch.compile``: one new token per row over a
``KVCache``, with no host sync and no shape that changes from step to step.

The eager forward (``Transformer.forward``) slices the cache to the tokens written so far and
asks the host whether a mask is needed; here the new keys/values are written at a slot given as
a tensor and every step attends over the whole cache under a mask (``FixedShapeDecode``), so
one compiled graph serves every step of a generation (as gpt-fast's and HF's static-cache
decoding do). Compiled (``compiled_decode_step``), the per-op overhead of eager decoding is
gone and the elementwise ops fuse; on this CPU that overhead was a third of an int4 model's
decode step (docs/quantization.md). ``mlx_core.generate(..., compile=True)`` decodes with it.
Mixtures of experts route with no host sync (``mlx_core.models.moe``), so they compile too.

Under ``torch.compile`` the kernels' torch references run (inductor fuses them), and the
quantized layers call torch's CPU int8/int4 ops on the layouts an eager call made: run the model
eagerly once (a prompt's forward does) before the first compiled step.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from mlx_core.models.attention import FixedShapeDecode, KVCache


class DecodeStep(nn.Module):
    """``step(tokens [B], positions [B], slot [1]) -> logits [B, vocab]`` for ``model`` over
    ``self.cache`` (set before each generation: a cache of the shape it was built for): the new
    tokens are at ``positions`` (long, per row) and written at cache slot ``slot`` (long, one for
    every row, as ``KVCache.length`` is). Marks the slot valid in ``cache.key_valid``; the caller
    advances ``cache.length``, the positions and the slot.

    It holds the model's parts, not the model, so that a store keyed weakly by the model
    (``compiled_decode_step``) lets both go when the model goes."""

    def __init__(self, model: nn.Module, cache: KVCache | None = None):
        super().__init__()
        from mlx_core.models.transformer import Backbone

        if not isinstance(getattr(model, "model", None), Backbone):
            raise ValueError(f"the fixed-shape decode step takes the zoo's Transformer "
                             f"(mlx_core.load_model), not {type(model).__name__}")
        self.backbone, self.lm_head = model.model, model.lm_head
        self.cache = cache

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        backbone, cache = self.backbone, self.cache
        cache.key_valid.index_fill_(1, slot, True)
        key_slots = torch.arange(cache.max_length, device=slot.device)
        causal = key_slots <= slot
        metas = {}
        for window in set(backbone.layer_windows):  # a mask per attention window
            allowed = causal if window is None else causal & (slot - key_slots < window)
            metas[window] = FixedShapeDecode(cache, slot,
                                             (cache.key_valid & allowed)[:, None, None, :])
        x = backbone.embed_tokens(tokens[:, None])
        tables = None
        if backbone.rope_inv_freq is not None:
            tables = backbone.rope_tables(positions[:, None], x.dtype)
        else:
            x = x + backbone.embed_positions(positions[:, None])
        for layer, (cos_sin, meta) in zip(backbone.layers, backbone.layer_inputs(tables, metas),
                                          strict=True):
            x = layer(x, cos_sin, meta)
        logits = self.lm_head(backbone.norm(x))[:, 0]
        cap = backbone.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


# compiled steps per model, per (batch size, cache length); dropped with their model
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# cache lengths of compiled generation are rounded up to a multiple of this: one compiled graph
# serves every prompt + max_new_tokens up to it (each further slot costs a little attention)
CACHE_LENGTH_STEP = 128


def compiled_cache_length(tokens: int) -> int:
    return -(-tokens // CACHE_LENGTH_STEP) * CACHE_LENGTH_STEP


def compiled_decode_step(model: nn.Module, cache: KVCache) -> DecodeStep:
    """The compiled ``DecodeStep`` of ``model`` for caches shaped as ``cache``, set to decode over
    ``cache``. Compiled whole (``fullgraph=True``: a graph break is an error, not a silent
    slowdown) on first use for a model, batch size and cache length, which takes seconds to a
    minute; kept for the model's later generations."""
    batch, length = cache.key_valid.shape
    steps = _COMPILED.setdefault(model, {})
    if (batch, length) not in steps:
        with torch.inference_mode():  # an eager one-token forward makes the kernels' CPU layouts
            model(torch.zeros(batch, 1, dtype=torch.long, device=cache.key_valid.device),
                  kv_cache=model.new_cache(batch, 1))
        # every model, batch size and cache length is one graph of the same code (DecodeStep's
        # forward): dynamo's per-code limit (8) would refuse the ninth with fullgraph=True
        limit = torch._dynamo.config
        limit.recompile_limit = max(limit.recompile_limit, 64)
        limit.accumulated_recompile_limit = max(limit.accumulated_recompile_limit, 1024)
        steps[batch, length] = torch.compile(DecodeStep(model), fullgraph=True, dynamic=False)
    step = steps[batch, length]
    step.cache = cache  # the compiled module forwards attribute writes to the DecodeStep
    return step
