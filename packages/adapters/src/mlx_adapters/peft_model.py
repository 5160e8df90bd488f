"""``PeftModel``: a base model with named adapters, in PEFT's shape and on-disk format.

The wrapped model lives at ``peft_model.base_model.model`` (as in PEFT), so parameter names are
``base_model.model.<the base model's names>``.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from pathlib import Path

import torch
from torch import nn

from mlx_adapters.config import load_config
from mlx_adapters.layer import AdapterLayer, replace_module
from mlx_adapters.modules_to_save import ModulesToSaveWrapper, wrap_modules_to_save
from mlx_adapters.peft_format import bias_names, load_adapter_weights, save_adapter_weights
from mlx_adapters.targets import find_targets
from mlx_core.peft_config import PeftConfig


def _method(config: PeftConfig):
    from mlx_core import registry
    from mlx_core.plugins import load_plugins

    load_plugins()
    return registry.adapter_methods.get(config.peft_type.lower())


class AdapterModel(nn.Module):
    """PEFT's ``LoraModel`` level: holds ``.model`` (the base) so names gain ``model.``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class PeftModel(nn.Module):
    def __init__(self, model: nn.Module, config: PeftConfig, adapter_name: str = "default"):
        super().__init__()
        self.base_model = AdapterModel(model)
        self.prompt_encoder = nn.ModuleDict()  # prompt-learning adapters
        self.peft_config: dict[str, PeftConfig] = {}
        self.rank_allocator = None  # AdaLoRA's, for its one trainable adapter
        self.active_adapter = adapter_name
        self.add_adapter(adapter_name, config)

    # --- adapters --------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: PeftConfig) -> None:
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter it first")
        method = _method(config)
        prompt_learning = getattr(config, "is_prompt_learning", False)
        if self.peft_config and any(getattr(c, "is_prompt_learning", False) != prompt_learning
                                    for c in self.peft_config.values()):
            raise ValueError("prompt learning (prompt or prefix tuning) and layer adapters (LoRA, IA3, "
                             "AdaLoRA) cannot share one model; wrap a fresh base model instead")
        if hasattr(method, "check_new"):
            method.check_new(self, config)
        try:
            if prompt_learning:
                self.prompt_encoder[adapter_name] = method.make_encoder(config, self.base_model.model)
            else:
                targets = find_targets(self.base_model.model, config)
                method.inject(self.base_model.model, config, adapter_name, targets)
        except Exception:  # leave no half-added adapter behind
            for layer in self._switchable():
                layer.delete(adapter_name)
            raise
        if hasattr(method, "on_added"):
            method.on_added(self, adapter_name, config)
        if config.modules_to_save:
            wrap_modules_to_save(self.base_model.model, list(config.modules_to_save), adapter_name)
        self.peft_config[adapter_name] = config
        self.set_adapter(self.active_adapter if self.active_adapter in self.peft_config else adapter_name)
        self._freeze_base()

    def _layers(self):
        return [m for m in self.modules() if isinstance(m, AdapterLayer)]

    def _switchable(self):
        """Adapter layers and modules_to_save wrappers: what set/disable/delete act on."""
        return [m for m in self.modules() if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))]

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has {list(self.peft_config)}")
        self.active_adapter = names[0] if len(names) == 1 else names
        for layer in self._switchable():
            owned = layer.modules_to_save if isinstance(layer, ModulesToSaveWrapper) else layer.adapter_names()
            layer.active_adapters = [n for n in names if n in owned]
        self._freeze_base()

    def _freeze_base(self) -> None:
        """Only the active adapters train (PEFT's rule); inference-mode configs train nothing;
        ``bias="all"`` / ``"lora_only"`` also train every bias / the wrapped layers' biases."""
        active = set(self.active_adapters)
        tables = {t for layer in self._switchable() for t in layer.tables} | {"prompt_encoder"}
        for name, param in self.named_parameters():
            parts = name.split(".")
            table = next((t for t in tables if t in parts), None)
            adapter = parts[parts.index(table) + 1] if table else None
            param.requires_grad = bool(adapter in active
                                       and not self.peft_config[adapter].inference_mode)
        modes = {getattr(self.peft_config[a], "bias", "none") for a in active
                 if a in self.peft_config and not self.peft_config[a].inference_mode}
        for mode in ("all", "lora_only"):
            if mode in modes:
                params = dict(self.named_parameters())
                for key in bias_names(self, mode):
                    params[key].requires_grad = True

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; this model has {list(self.peft_config)}")
        for layer in self._switchable():
            layer.delete(adapter_name)
        if adapter_name in self.prompt_encoder:
            del self.prompt_encoder[adapter_name]
        if self.rank_allocator is not None and self.rank_allocator.adapter_name == adapter_name:
            self.rank_allocator = None
        del self.peft_config[adapter_name]
        if adapter_name in self.active_adapters:
            remaining = list(self.peft_config)
            self.active_adapter = remaining[0] if remaining else None
            if remaining:
                self.set_adapter(remaining[0])

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the ``with`` block (but for biases trained with
        ``bias="all"``/``"lora_only"``: they are the base model's own, as in PEFT)."""
        trained = {getattr(self.peft_config[a], "bias", "none") for a in self.active_adapters
                   if a in self.peft_config} - {"none"}
        if trained:
            warnings.warn(f"disable_adapter with bias={sorted(trained)[0]!r}: the trained biases stay, "
                          "so the output is not the original base model's", stacklevel=3)
        layers = self._switchable()
        for layer in layers:
            layer.disabled = True
        self._prompt_disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False
            self._prompt_disabled = False

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, svd_full_matrices: bool = True,
                             svd_driver: str | None = None, density: float | None = None,
                             majority_sign_method: str = "total",
                             generator: torch.Generator | None = None) -> None:
        """A new LoRA adapter combining existing ones, with PEFT's semantics. ``cat``: exact,
        ranks concatenated. ``linear`` / ``ties`` / ``dare_linear`` / ``dare_ties`` /
        ``magnitude_prune``: A and B merged separately with sqrt weights (one rank). ``svd`` and
        the ``*_svd`` forms: the weighted deltas merged, truncated to ``svd_rank`` (optionally
        clamped at the ``svd_clamp`` quantile). ``density`` is the share of values TIES / DARE /
        magnitude pruning keep; ``majority_sign_method`` is ``total`` or ``frequency``. DARE
        draws from the global RNG as PEFT does, or from ``generator``."""
        from mlx_adapters.weighted import combine_lora

        combine_lora(self, adapters, weights, adapter_name, combination_type, svd_rank,
                     svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices,
                     svd_driver=svd_driver, density=density,
                     majority_sign_method=majority_sign_method, generator=generator)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (its adapted layers still wrapped), as PEFT's ``get_base_model``."""
        return self.base_model.model

    # --- merging ---------------------------------------------------------------------------
    def merge_adapter(self) -> None:
        for layer in self._layers():
            layer.merge(layer.active_adapters)

    def unmerge_adapter(self) -> None:
        for layer in self._layers():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Fold the active adapters into the base weights; return the plain base model."""
        model = self.base_model.model
        for name, module in list(model.named_modules()):
            if isinstance(module, AdapterLayer):
                module.merge(module.active_adapters, keep_original=False)
                replace_module(model, name, module.base_layer)
            elif isinstance(module, ModulesToSaveWrapper):
                replace_module(model, name, module.active_module())
        return model

    def unload(self) -> nn.Module:
        """Remove every adapter without merging; return the plain base model."""
        self.unmerge_adapter()
        model = self.base_model.model
        for name, module in list(model.named_modules()):
            if isinstance(module, AdapterLayer):
                replace_module(model, name, module.base_layer)
            elif isinstance(module, ModulesToSaveWrapper):
                replace_module(model, name, module.original_module)
        return model

    # --- parameters ------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        params = {id(p): p for p in self.parameters()}.values()
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100 * trainable / total:.4f}")

    _prompt_disabled = False

    def _prompt_adapter(self) -> str | None:
        """The active prompt-learning adapter, if one runs now."""
        active = self.active_adapter if isinstance(self.active_adapter, str) else None
        return active if active in self.prompt_encoder and not self._prompt_disabled else None

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        prompt = self._prompt_adapter()
        if prompt is not None:
            method = _method(self.peft_config[prompt])
            out = method.prompt_forward(self, self.prompt_encoder[prompt], input_ids, attention_mask,
                                        labels, **kwargs)
        else:
            if labels is not None:
                kwargs["labels"] = labels
            out = self.base_model(input_ids, attention_mask, **kwargs)
        if labels is not None and self.rank_allocator is not None:  # AdaLoRA's orthogonality term
            weight = self.rank_allocator.config.orth_reg_weight
            if isinstance(out, torch.Tensor):  # a zoo model's loss
                out = out + weight * self.rank_allocator.regularization()
            elif getattr(out, "loss", None) is not None:
                out.loss = out.loss + weight * self.rank_allocator.regularization()
        return out

    def update_and_allocate(self, global_step: int) -> None:
        """AdaLoRA: update the importance scores and re-allocate the rank budget; call it every
        step after ``loss.backward()`` and before ``optimizer.zero_grad()``."""
        from mlx_adapters.adalora import update_and_allocate

        update_and_allocate(self, global_step)

    def generate(self, *args, **kwargs):
        """HF ``generate`` of the base model, as ``peft_model.generate(**inputs)`` in PEFT. The
        active LoRA / DoRA / IA³ / AdaLoRA layers sit inside the base model, so its own
        ``generate`` runs them (and none inside ``disable_adapter()``). An active prompt or prefix
        adapter adds its virtual tokens as PEFT does: at each step the attention mask gains
        ``num_virtual_tokens`` ones in front; on the first step the prompt's embeddings go in
        front of the input's (prompt tuning) or the cache starts as the prefix (prefix tuning).
        On an encoder-decoder model the prompt goes in front of the encoder's input, once, and
        the prefix into the decoder's self-attention (its mask extended)."""
        base = self.base_model.model
        prompt = self._prompt_adapter()
        if not callable(getattr(base, "generate", None)):
            if prompt is None:
                how = ("generate with mlx_core.generate(peft_model.base_model.model, prompt_ids), "
                       "which runs the adapter layers in place")
            elif hasattr(_method(self.peft_config[prompt]), "new_cache"):
                how = ("decode with cache = peft_model.new_cache(batch_size), then "
                       "peft_model(ids, kv_cache=cache) for the prompt and each new token")
            else:
                how = ("call peft_model(ids) for each new token (no cache; the logits of the "
                       "virtual tokens come first)")
            raise ValueError(f"{type(base).__name__} has no HF generate (a zoo model): {how}")
        if prompt is None:
            return base.generate(*args, **kwargs)
        config = self.peft_config[prompt]
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError(f"generate with the {config.peft_type} adapter {prompt!r} takes input_ids, "
                             "not inputs_embeds (PEFT cannot either): pass the token ids, and the "
                             "virtual tokens are added to their embeddings")
        return self._generate_with_prompt(base, prompt, args, kwargs)

    def _generate_with_prompt(self, base: nn.Module, prompt: str, args, kwargs):
        """Run HF generate with the base model's ``prepare_inputs_for_generation`` wrapped, so
        each step's inputs get the active prompt-learning adapter's virtual tokens."""
        from mlx_adapters.prefix_tuning import hf_cache_name
        from mlx_adapters.prompt_tuning import extend_mask, is_encoder_decoder

        config, encoder = self.peft_config[prompt], self.prompt_encoder[prompt]
        method, n, cache_name = _method(config), config.num_virtual_tokens, hf_cache_name(base)
        if hasattr(method, "encoder_generate_inputs") and is_encoder_decoder(base):
            return base.generate(*args, **method.encoder_generate_inputs(self, encoder, kwargs))
        mask_key = method.mask_key(base)
        prepare = base.prepare_inputs_for_generation

        @functools.wraps(prepare)
        def prepare_with_prompt(*step_args, **step_kwargs):
            inputs = prepare(*step_args, **step_kwargs)
            mask = inputs.get(mask_key)
            if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
                raise ValueError(f"generate with the {config.peft_type} adapter {prompt!r} needs a "
                                 "2-D attention mask, but this step's is prepared as a "
                                 f"{'dict' if isinstance(mask, dict) else f'{mask.dim()}-D'} mask (a "
                                 "static or compiled cache?): drop cache_implementation / "
                                 "past_key_values and generate with the default dynamic cache")
            if not inputs.get("use_cache", True):  # every step sees the whole sequence again
                inputs.pop(cache_name, None)
            cache = inputs.get(cache_name)
            fresh = cache is None or cache.get_seq_length() == 0
            inputs[mask_key] = extend_mask(mask, n)
            return method.generation_inputs(self, encoder, inputs, fresh)

        own = vars(base).get("prepare_inputs_for_generation")  # an instance attribute, if any
        base.prepare_inputs_for_generation = prepare_with_prompt
        try:
            return base.generate(*args, **kwargs)
        finally:
            if own is None:
                del base.prepare_inputs_for_generation
            else:
                base.prepare_inputs_for_generation = own

    def new_cache(self, batch_size: int):
        """Prefix tuning on a zoo model: a cache holding the prefix, for incremental decoding
        (``model(ids, kv_cache=cache)``, then one token at a time)."""
        prompt = self._prompt_adapter()
        method = _method(self.peft_config[prompt]) if prompt else None
        if not hasattr(method, "new_cache"):
            raise ValueError("new_cache is for an active prefix-tuning adapter; other adapters use "
                             "the base model's own cache")
        return method.new_cache(self.prompt_encoder[prompt], self.base_model.model, batch_size)

    # --- PEFT's on-disk format -------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, selected_adapters: list[str] | None = None,
                        path_initial_model_for_weight_conversion: str | Path | None = None) -> None:
        """One sub-directory per non-default adapter, as PEFT does; ``default`` at the top.

        ``path_initial_model_for_weight_conversion``: the directory a PiSSA / OLoRA adapter was
        saved to right after initialisation; the adapter is then saved as a plain LoRA of twice
        the rank that applies to the original (not the residual) base model."""
        unknown = [n for n in selected_adapters or [] if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has {list(self.peft_config)}")
        for name in selected_adapters or list(self.peft_config):
            out = Path(directory) if name == "default" else Path(directory) / name
            if path_initial_model_for_weight_conversion is None:
                save_adapter_weights(self, name, out)
                continue
            from mlx_adapters.mutated_init import as_plain_lora

            config, tensors = as_plain_lora(self, name, path_initial_model_for_weight_conversion)
            save_adapter_weights(self, name, out, config, tensors)

    def load_adapter(self, directory: str | Path, adapter_name: str, is_trainable: bool = False) -> None:
        config = load_config(directory)
        config.inference_mode = not is_trainable
        self.add_adapter(adapter_name, config)
        load_adapter_weights(self, adapter_name, Path(directory))
        self._freeze_base()

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path, adapter_name: str = "default",
                        is_trainable: bool = False) -> PeftModel:
        config = load_config(directory)
        config.inference_mode = not is_trainable
        peft_model = cls(model, config, adapter_name)
        load_adapter_weights(peft_model, adapter_name, Path(directory))
        peft_model._freeze_base()
        return peft_model


def get_peft_model(model: nn.Module, config: PeftConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap ``model`` (a zoo model or any ``nn.Module`` with ``nn.Linear`` layers, HF models
    included) with a new, trainable adapter. A zoo model also gets selective recompute
    (``mlx_core.transforms.selective_recompute``: less activation memory in training, the same
    gradients)."""
    from mlx_core.transforms import selective_recompute

    return PeftModel(selective_recompute(model), config, adapter_name)


__all__ = ["PeftModel", "get_peft_model"]
