"""Prompt tuning (Lester et al. 2021): ``num_virtual_tokens`` learned embeddings prepended to
every input; the model itself is frozen and unchanged. PEFT's names: the embeddings live at
``prompt_encoder.<adapter>.embedding.weight`` and are saved as ``prompt_embeddings``.

Encoder-decoder models (T5, BART; ``task_type="SEQ_2_SEQ_LM"``, PEFT's
``num_transformer_submodules=2``): the virtual tokens go in front of the encoder's input only.
PEFT's table has ``2 * num_virtual_tokens`` rows, of which the first ``num_virtual_tokens`` are
used; all are saved, so the files are PEFT's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mlx_core.peft_config import PeftConfig

SUBMODULES_RULE = ("num_transformer_submodules must be None (from task_type), 1 (decoder-only) "
                   "or 2 (encoder-decoder, task_type='SEQ_2_SEQ_LM')")


@dataclass
class PromptTuningConfig(PeftConfig):
    peft_type: str = "PROMPT_TUNING"
    num_virtual_tokens: int = 8
    token_dim: int | None = None  # filled from the model's embedding size
    num_transformer_submodules: int | None = None  # 1 decoder-only, 2 encoder-decoder; from task_type
    num_attention_heads: int | None = None
    num_layers: int | None = None
    prompt_tuning_init: str = "RANDOM"  # "RANDOM" | "TEXT"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = field(default=None)

    is_prompt_learning = True

    def __post_init__(self):
        if self.num_virtual_tokens <= 0:
            raise ValueError(f"invalid PromptTuningConfig: num_virtual_tokens must be positive, got "
                             f"{self.num_virtual_tokens}")
        if self.prompt_tuning_init not in ("RANDOM", "TEXT"):
            raise ValueError("invalid PromptTuningConfig: prompt_tuning_init must be 'RANDOM' or 'TEXT'")
        if self.prompt_tuning_init == "TEXT" and not (self.prompt_tuning_init_text and self.tokenizer_name_or_path):
            raise ValueError("invalid PromptTuningConfig: TEXT init needs prompt_tuning_init_text and "
                             "tokenizer_name_or_path (a model name, directory or .gguf mlx can load)")
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ValueError(f"invalid PromptTuningConfig: {SUBMODULES_RULE}, got "
                             f"{self.num_transformer_submodules}")


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def fill_transformer_submodules(config, model: nn.Module) -> None:
    """PEFT's rule: ``num_transformer_submodules`` is 2 for ``task_type="SEQ_2_SEQ_LM"``, else 1;
    both must fit the model (encoder-decoder or not)."""
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == "SEQ_2_SEQ_LM" else 1
    seq2seq = is_encoder_decoder(model)
    if config.num_transformer_submodules != 1 + seq2seq or (config.task_type == "SEQ_2_SEQ_LM") != seq2seq:
        kind, task = ("an encoder-decoder model", "'SEQ_2_SEQ_LM'") if seq2seq else ("decoder-only", "'CAUSAL_LM'")
        raise ValueError(f"{type(model).__name__} is {kind}, but this {type(config).__name__} has "
                         f"task_type={config.task_type!r} and num_transformer_submodules="
                         f"{config.num_transformer_submodules}: set task_type={task} and "
                         f"num_transformer_submodules={1 + seq2seq} (or leave it None)")


class PromptEmbedding(nn.Module):
    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Embedding):
        super().__init__()
        weight = word_embeddings.weight
        self.num_virtual_tokens = n = config.num_virtual_tokens
        rows = n * config.num_transformer_submodules  # PEFT's table (the used rows first)
        self.embedding = nn.Embedding(rows, weight.shape[1], device=weight.device, dtype=weight.dtype)
        if config.prompt_tuning_init == "TEXT":
            from mlx_core import load_tokenizer

            ids = load_tokenizer(config.tokenizer_name_or_path).encode(
                config.prompt_tuning_init_text, add_special_tokens=False)
            ids = (ids * (rows // len(ids) + 1))[:rows]  # repeat the text's tokens to fill, as PEFT does
            with torch.no_grad():
                self.embedding.weight.copy_(weight[torch.tensor(ids, device=weight.device)])

    def forward(self, batch_size: int) -> torch.Tensor:
        """The virtual tokens' embeddings ``[B, num_virtual_tokens, H]``."""
        tokens = torch.arange(self.num_virtual_tokens, device=self.embedding.weight.device)
        return self.embedding(tokens).unsqueeze(0).expand(batch_size, -1, -1)

    def embeddings_to_save(self) -> torch.Tensor:
        """PEFT's saved ``prompt_embeddings``."""
        return self.embedding.weight

    def load_prompt_embeddings(self, saved: torch.Tensor) -> None:
        with torch.no_grad():
            self.embedding.weight.copy_(saved)

    def saved_shape(self) -> tuple[int, int]:
        return tuple(self.embedding.weight.shape)


def input_embeddings(model: nn.Module) -> nn.Embedding:
    """The token embedding of a zoo model or an HF model."""
    if hasattr(model, "get_input_embeddings"):
        return model.get_input_embeddings()
    return model.model.embed_tokens


def extend_mask(attention_mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """A 2-D attention mask with ``n`` ones in front: the virtual tokens (prompt or prefix) are
    attended by every row. ``None`` (attend to everything) stays ``None``."""
    if attention_mask is None:
        return None
    ones = attention_mask.new_ones(attention_mask.shape[0], n)
    return torch.cat((ones, attention_mask), dim=1)


def prepend_prompt(prompt: torch.Tensor, embed: nn.Embedding, input_ids, attention_mask, labels):
    """``inputs_embeds``, mask and labels with the virtual tokens in front (-100 labels)."""
    b, n = input_ids.shape[0], prompt.shape[1]
    inputs_embeds = torch.cat((prompt.to(embed.weight.dtype), embed(input_ids)), dim=1)
    attention_mask = extend_mask(attention_mask, n)
    if labels is not None:
        ignored = torch.full((b, n), -100, dtype=labels.dtype, device=labels.device)
        labels = torch.cat((ignored, labels), dim=1)
    return inputs_embeds, attention_mask, labels


class PromptTuningTuner:
    config_class = PromptTuningConfig
    layer_class = None

    @staticmethod
    def make_encoder(config: PromptTuningConfig, model: nn.Module) -> PromptEmbedding:
        fill_transformer_submodules(config, model)
        embed = input_embeddings(model)
        config.token_dim = embed.weight.shape[1]
        return PromptEmbedding(config, embed)

    @staticmethod
    def prompt_forward(peft_model, encoder: PromptEmbedding, input_ids, attention_mask, labels, **kwargs):
        """The base model on the virtual tokens followed by the input's own embeddings (an
        encoder-decoder model's encoder input; its labels are the decoder's, left as they are)."""
        if input_ids is None:
            raise ValueError("prompt tuning needs input_ids [B, T]")
        model = peft_model.base_model.model
        inputs_embeds, attention_mask, prompt_labels = prepend_prompt(
            encoder(input_ids.shape[0]), input_embeddings(model), input_ids, attention_mask, labels)
        labels = labels if is_encoder_decoder(model) else prompt_labels
        return peft_model.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                     labels=labels, **kwargs)

    @staticmethod
    def mask_key(model: nn.Module) -> str:
        """The mask the virtual tokens extend: the input's (the encoder's)."""
        return "attention_mask"

    @staticmethod
    def encoder_generate_inputs(peft_model, encoder: PromptEmbedding, kwargs: dict) -> dict:
        """HF ``generate``'s inputs on an encoder-decoder model, which runs the encoder once before
        decoding: the encoder input becomes the virtual tokens' embeddings in front of the
        input's, its mask extended (PEFT's way); the decoding steps are the model's own."""
        if kwargs.get("input_ids") is None:
            raise ValueError("generate with a prompt-tuning adapter on an encoder-decoder model takes "
                             "input_ids=... (a keyword, as in PEFT)")
        kwargs = dict(kwargs)
        ids = kwargs.pop("input_ids")
        kwargs["inputs_embeds"], kwargs["attention_mask"], _ = prepend_prompt(
            encoder(ids.shape[0]), input_embeddings(peft_model.base_model.model), ids,
            kwargs.get("attention_mask"), None)
        return kwargs

    @staticmethod
    def generation_inputs(peft_model, encoder: PromptEmbedding, inputs: dict, fresh: bool) -> dict:
        """One step of HF ``generate`` (the mask is already extended): on a ``fresh`` step (empty
        cache) the virtual tokens go in front of the input's embeddings; later steps feed only
        the new token, the virtual tokens being in the cache. As in PEFT the model numbers the
        positions itself, virtual tokens included, so generate's own position ids are dropped."""
        inputs.pop("position_ids", None)
        inputs.pop("cache_position", None)  # transformers < 5: the model derives it likewise
        if fresh:
            ids = inputs["input_ids"]
            embed = input_embeddings(peft_model.base_model.model)
            inputs["inputs_embeds"] = prepend_prompt(encoder(ids.shape[0]), embed, ids, None, None)[0]
            inputs["input_ids"] = None
        return inputs
