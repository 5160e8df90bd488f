"""Prefix tuning (Li & Liang 2021): ``num_virtual_tokens`` learned keys and values per layer that
every query attends to before the input's own; the model itself is frozen and unchanged.

PEFT's layout: one tensor ``[num_virtual_tokens, num_layers * 2 * token_dim]`` (per layer: the
keys, then the values, each ``kv_heads x head_dim``), learned directly
(``prompt_encoder.<adapter>.embedding.weight``) or, with ``prefix_projection``, as the output of
a two-layer tanh MLP over ``token_dim``-wide token embeddings (a reparameterisation that helps
training). Either way the adapter file holds that tensor, the MLP's output, as
``prompt_embeddings``: the MLP is not saved (PEFT's format), so a loaded adapter is the flat
prefix.

HF models take the prefix as their cache (``past_key_values``, ``cache`` from transformers 5: a
``DynamicCache``; on Gemma 2 / Gemma 3 text models one laid out by the model's config, as PEFT
builds it), as PEFT passes it, in the forward and in ``generate``; zoo
models as a ``PrefixCache``, the zoo's cache interface over the prefix, so no change to the
model is needed. Queries see the prefix at positions ``0 .. n-1`` (no rotary embedding: the
learned keys are used as they are) and start at position ``n``.

Encoder-decoder HF models (T5, BART; ``task_type="SEQ_2_SEQ_LM"``, PEFT's
``num_transformer_submodules=2``): the same ``[num_virtual_tokens, num_layers * 2 * token_dim]``
tensor, laid out as PEFT reads it: only the decoder's self-attention sees a prefix (the encoder
and the cross-attention none), decoder layer ``i`` taking the prefix's layer ``2 * i mod
num_layers``, and the decoder's mask grows by ``num_virtual_tokens``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from mlx_adapters.prompt_tuning import (
    SUBMODULES_RULE,
    extend_mask,
    fill_transformer_submodules,
    is_encoder_decoder,
)
from mlx_core.models.attention import KVCache
from mlx_core.peft_config import PeftConfig


@dataclass
class PrefixTuningConfig(PeftConfig):
    peft_type: str = "PREFIX_TUNING"
    num_virtual_tokens: int = 20
    token_dim: int | None = None  # kv_heads x head_dim, filled from the model
    num_transformer_submodules: int | None = None  # 1 decoder-only, 2 encoder-decoder; from task_type
    num_attention_heads: int | None = None  # the model's key/value heads (GQA), filled in
    num_layers: int | None = None  # filled from the model
    encoder_hidden_size: int | None = None  # the MLP's width (prefix_projection); token_dim if None
    prefix_projection: bool = False
    init_weights: str | None = None  # None: random; "zero": a prefix of zeros

    is_prompt_learning = True

    def __post_init__(self):
        problems = []
        if self.num_virtual_tokens is None or self.num_virtual_tokens <= 0:
            problems.append(f"num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
        if self.init_weights not in (None, "zero"):
            problems.append(f"init_weights must be None (random) or 'zero', got {self.init_weights!r}")
        if self.num_transformer_submodules not in (None, 1, 2):
            problems.append(f"{SUBMODULES_RULE}, got {self.num_transformer_submodules}")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            problems.append(f"encoder_hidden_size must be positive, got {self.encoder_hidden_size}")
        if problems:
            raise ValueError("invalid PrefixTuningConfig: " + "; ".join(problems))


def prefix_geometry(model: nn.Module) -> tuple[int, int, int]:
    """``(layers, key/value heads, head dim)`` of a zoo model or an HF transformers model,
    read as PEFT reads it (GQA models get a prefix of their key/value heads)."""
    from mlx_core.config import ModelConfig

    config = getattr(model, "config", None)
    if isinstance(config, ModelConfig):
        return config.num_layers, config.kv_heads, config.dim_per_head
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError(f"prefix tuning needs a zoo Transformer or an HF transformers model (with a "
                         f".config); got {type(model).__name__}")
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    values = config.to_dict()

    def first(*names):
        found = [getattr(config, n, None) or values.get(n) for n in names]
        return next((v for v in found if v), None)

    layers = first("num_hidden_layers", "num_layers", "n_layer")
    hidden = first("hidden_size", "n_embd", "d_model")
    heads = first("num_attention_heads", "n_head", "num_heads")
    if not (layers and hidden and heads):
        raise ValueError(f"cannot read the layer count, hidden size and heads of this "
                         f"{type(model).__name__}'s config; set num_layers, token_dim and "
                         "num_attention_heads in PrefixTuningConfig")
    kv_heads = first("num_key_value_heads") or heads
    head_dim = first("head_dim") or hidden // heads
    return layers, kv_heads, head_dim


def accepts_zoo_cache(model: nn.Module) -> bool:
    return "kv_cache" in inspect.signature(model.forward).parameters


def hf_cache_name(model: nn.Module) -> str:
    """The keyword an HF model's forward takes its cache under: ``cache`` from transformers 5,
    ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class PrefixEncoder(nn.Module):
    """The learned prefix: ``forward()`` gives ``[num_virtual_tokens, layers * 2 * token_dim]``."""

    def __init__(self, config: PrefixTuningConfig, device, dtype):
        super().__init__()
        self.num_virtual_tokens, self.num_layers = config.num_virtual_tokens, config.num_layers
        self.kv_heads = config.num_attention_heads
        self.head_dim = config.token_dim // config.num_attention_heads
        width = config.num_layers * 2 * config.token_dim
        factory = dict(device=device, dtype=dtype)
        # A loaded adapter (inference mode) is the MLP's output already, as in PEFT.
        self.projected = config.prefix_projection and not config.inference_mode
        if self.projected:
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim, **factory)
            self.transform = nn.Sequential(
                nn.Linear(config.token_dim, config.encoder_hidden_size, **factory), nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, width, **factory))
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width, **factory)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self) -> torch.Tensor:
        weight = self.embedding.weight
        return self.transform(weight) if self.projected else weight

    def key_values(self, batch_size: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer, the prefix keys and values ``[B, kv_heads, num_virtual_tokens, head_dim]``."""
        n = self.num_virtual_tokens
        prefix = self().to(dtype).view(n, self.num_layers * 2, self.kv_heads, self.head_dim)
        prefix = prefix.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch_size, -1, -1, -1)
        return list(prefix[0::2]), list(prefix[1::2])

    def embeddings_to_save(self) -> torch.Tensor:
        """PEFT's saved ``prompt_embeddings``: the prefix itself (the MLP's output)."""
        return self().detach()

    def load_prompt_embeddings(self, saved: torch.Tensor) -> None:
        """Load a saved prefix; an encoder with an MLP becomes the flat prefix it produced (the
        MLP cannot be recovered from its output), as PEFT loads it."""
        if self.projected:
            weight = self.embedding.weight
            self.embedding = nn.Embedding(*saved.shape, device=weight.device, dtype=weight.dtype)
            del self.transform
            self.projected = False
        with torch.no_grad():
            self.embedding.weight.copy_(saved)

    def saved_shape(self) -> tuple[int, int]:
        return self.num_virtual_tokens, self.num_layers * 2 * self.kv_heads * self.head_dim


class PrefixCache(KVCache):
    """The zoo's cache interface (``length``, ``key_valid``, ``append_mask``, ``update``,
    ``advance``) over per-layer prefix keys/values: each layer attends over the prefix followed
    by its own keys. Nothing is written in place, so gradients flow to the prefix.

    ``grow=False`` (one forward pass, training): ``update`` returns prefix + this pass's keys and
    keeps nothing, so recomputing a layer (gradient checkpointing) gives the same result.
    ``grow=True`` (incremental decoding): each pass's keys are kept for the next.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], *, grow: bool = False):
        # No super().__init__(): nothing is preallocated, the keys live in per-layer lists.
        batch, _, n, _ = keys[0].shape
        self.layer_keys, self.layer_values = list(keys), list(values)
        self.key_valid = torch.ones(batch, n, dtype=torch.bool, device=keys[0].device)
        self.length = n
        self.max_length = None
        self.grow = grow

    def append_mask(self, valid: torch.Tensor) -> None:
        self.key_valid = torch.cat((self.key_valid, valid.to(torch.bool)), dim=1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        keys = torch.cat((self.layer_keys[layer].to(k.dtype), k), dim=2)
        values = torch.cat((self.layer_values[layer].to(v.dtype), v), dim=2)
        if self.grow:
            self.layer_keys[layer], self.layer_values[layer] = keys, values
        return keys, values

    def advance(self, n: int) -> None:
        self.length += n


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


# Model types whose prefix cache PEFT builds from the model's config, so that it has the model's
# own per-layer cache kinds (sliding-window layers among them) rather than plain layers.
CONFIG_SHAPED_CACHE_MODELS = ("gemma2", "gemma3_text")


def _hf_prefix_cache(encoder: PrefixEncoder, model: nn.Module, batch_size: int):
    """The prefix as an HF ``DynamicCache`` holding ``num_virtual_tokens`` keys/values per layer;
    on an encoder-decoder model, an ``EncoderDecoderCache`` whose self-attention part holds them
    in PEFT's order (module docstring) and whose cross-attention part is empty.

    Gemma 2 and Gemma 3 (text), as in PEFT: the cache is laid out by the model's config, so a
    sliding-window layer keeps (of the prefix, then of the input) only the last
    ``sliding_window - 1`` positions, as the model's own cache does; the logits are those of a
    plain cache (the attention mask hides the dropped positions either way), but generate's
    memory in those layers stays bounded."""
    from transformers import DynamicCache, EncoderDecoderCache

    keys, values = encoder.key_values(batch_size, _model_dtype(model))
    if not is_encoder_decoder(model):
        shaped = getattr(model.config, "model_type", None) in CONFIG_SHAPED_CACHE_MODELS
        layout = {"config": model.config} if shaped else {}
        return DynamicCache(list(zip(keys, values, strict=True)), **layout)
    layers = len(keys)
    order = [2 * i % layers for i in range(layers)]
    return EncoderDecoderCache(DynamicCache([(keys[j], values[j]) for j in order]), DynamicCache())


def _positions_after_prefix(inputs: dict, n: int) -> None:
    """As PEFT: given position ids count from the input's first token; they move past the prefix."""
    if inputs.get("position_ids") is not None:
        inputs["position_ids"] = inputs["position_ids"] + n


class PrefixTuningTuner:
    config_class = PrefixTuningConfig
    layer_class = None

    @staticmethod
    def make_encoder(config: PrefixTuningConfig, model: nn.Module) -> PrefixEncoder:
        fill_transformer_submodules(config, model)
        layers, kv_heads, head_dim = prefix_geometry(model)
        needed = {"num_layers": layers, "num_attention_heads": kv_heads, "token_dim": kv_heads * head_dim}
        for name, value in needed.items():
            given = getattr(config, name)
            if given is None:
                setattr(config, name, value)
            elif given != value:
                raise ValueError(f"this prefix has {name}={given}, but the model needs {value} ({layers} "
                                 f"layers, {kv_heads} key/value heads of {head_dim}): an adapter for "
                                 "another base model?")
        if config.encoder_hidden_size is None:
            config.encoder_hidden_size = config.token_dim
        if not accepts_zoo_cache(model) and any(getattr(m, "gradient_checkpointing", False)
                                                for m in model.modules()):
            raise ValueError("prefix tuning on an HF model does not work with gradient checkpointing "
                             "(as in PEFT); disable it, or use the zoo model, where it works")
        param = next(model.parameters())
        return PrefixEncoder(config, param.device, param.dtype)

    @staticmethod
    def prompt_forward(peft_model, encoder: PrefixEncoder, input_ids, attention_mask, labels, **kwargs):
        """The base model with the prefix as its past keys/values. Given ``kv_cache`` (a zoo
        model's ``PrefixCache`` from ``new_cache``, for incremental decoding), that cache is used
        and ``attention_mask`` covers this call's tokens."""
        model = peft_model.base_model.model
        inputs = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if inputs is None:
            raise ValueError("prefix tuning needs input_ids [B, T] or inputs_embeds [B, T, H]")
        batch, n = inputs.shape[0], encoder.num_virtual_tokens
        cache = kwargs.pop("kv_cache", None)
        if cache is not None:
            if not isinstance(cache, PrefixCache):
                raise ValueError("a prefix-tuned model takes its kv_cache from peft_model.new_cache(...)")
            return peft_model.base_model(input_ids, attention_mask, labels=labels, kv_cache=cache, **kwargs)
        _positions_after_prefix(kwargs, n)
        if accepts_zoo_cache(model):
            keys, values = encoder.key_values(batch, _model_dtype(model))
            return peft_model.base_model(input_ids, extend_mask(attention_mask, n), labels=labels,
                                         kv_cache=PrefixCache(keys, values), **kwargs)
        kwargs["attention_mask"] = attention_mask
        key = PrefixTuningTuner.mask_key(model)
        kwargs[key] = extend_mask(kwargs.get(key), n)
        kwargs[hf_cache_name(model)] = _hf_prefix_cache(encoder, model, batch)
        return peft_model.base_model(input_ids=input_ids, labels=labels, **kwargs)

    @staticmethod
    def mask_key(model: nn.Module) -> str:
        """The mask the prefix extends: that of the (decoder's) self-attention, which sees it."""
        return "decoder_attention_mask" if is_encoder_decoder(model) else "attention_mask"

    @staticmethod
    def generation_inputs(peft_model, encoder: PrefixEncoder, inputs: dict, fresh: bool) -> dict:
        """One step of HF ``generate`` (the mask is already extended): on a ``fresh`` step (empty
        cache) the cache becomes the prefix; every step's position ids move past the prefix."""
        model = peft_model.base_model.model
        name = hf_cache_name(model)
        ids = inputs["decoder_input_ids" if is_encoder_decoder(model) else "input_ids"]
        if fresh:
            inputs[name] = _hf_prefix_cache(encoder, model, ids.shape[0])
        _positions_after_prefix(inputs, encoder.num_virtual_tokens)
        if inputs.get("cache_position") is not None:  # transformers < 5: where the new keys go
            start = inputs[name].get_seq_length()
            inputs["cache_position"] = torch.arange(start, start + ids.shape[1],
                                                    device=inputs["cache_position"].device)
        return inputs

    @staticmethod
    def new_cache(encoder: PrefixEncoder, model: nn.Module, batch_size: int) -> PrefixCache:
        if not accepts_zoo_cache(model):
            raise ValueError("new_cache is for zoo models; HF models take past_key_values")
        keys, values = encoder.key_values(batch_size, _model_dtype(model))
        return PrefixCache([k.detach() for k in keys], [v.detach() for v in values], grow=True)
