"""One forward pass per step: the scheduled tokens of all sequences packed into one row.

Decodes (one new token) go first and run the paged-decode kernel; prompt chunks follow and run
varlen attention, which also reads each sequence's already-cached prefix from the paged cache.
Only the last position of each sequence that is due a new token goes through the LM head (and
the positions of its speculative drafts, whose tokens follow its own in the packed row), plus
the prompt positions whose log-probabilities a request asks for (``prompt_logprobs``).

With a RoPE whose table depends on the length (dynamic NTK, LongRoPE), each token takes the
table HF's generation of its sequence alone gives it: that of ``max(position + 1,
Sequence.rope_length)`` (the prompt's length for prompt tokens, its own for later ones), so
chunked prefill, preemption and drafts compute the same keys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from mlx_core.models.paged import PagedAttentionMetadata, PagedKVCache
from mlx_core.rope_scaling import is_length_dependent
from mlx_core.transforms import fuse_projections, prepack_linear_weights, uncopied_mlp_outputs
from mlx_serve.sequence import Sequence


def kv_bytes_per_block(config, block_size: int, dtype: torch.dtype) -> int:
    """Keys and values of every layer for one block."""
    item = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.kv_heads * config.dim_per_head * item


logger = logging.getLogger("mlx_serve")


def check_servable(config) -> None:
    """Refuse, naming the reason, a model the paged engine cannot run correctly."""
    if getattr(config, "is_mla", False):
        raise ValueError(
            f"mlx serve cannot run {config.model_type} yet: its multi-head latent attention "
            "(attention_kind='mla') caches one latent per token, and the paged KV cache stores "
            "per-head keys and values of one head size; storing the MLA latent in paged blocks is "
            "not implemented. Generate with mlx_core.generate (or `mlx generate`) instead")


class ModelRunner:
    def __init__(self, model: nn.Module, num_blocks: int, block_size: int,
                 prepack_weights: bool = True, fuse: bool = True):
        check_servable(model.config)
        self.model = uncopied_mlp_outputs(model)
        if fuse:
            fuse_projections(model)
        # on CPU in fp32 only; elsewhere nothing is packed (0 bytes)
        self.packed_bytes = prepack_linear_weights(model) if prepack_weights else 0
        if self.packed_bytes:
            logger.info("prepacked the linear weights for CPU inference (%.0f MiB more memory; "
                        "prepack_weights=False to save it)", self.packed_bytes / 2**20)
        self.device, self.dtype = model.device, model.dtype
        self.cache = PagedKVCache(model.config, num_blocks, block_size, dtype=self.dtype,
                                  device=self.device)
        self.block_size = block_size
        self.sliding_window = model.config.sliding_window
        self.rope_length_dependent = (model.config.position_kind == "rope"
                                      and is_length_dependent(model.config.rope_scaling))
        self.loras = None  # the engine's LoraManager, if any adapter may be used

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Sequence, int]]
                ) -> tuple[torch.Tensor, list[Sequence], PromptLogits | None]:
        """Run ``(sequence, num_new_tokens)`` pairs; return logits for the sequences whose new
        tokens reach their end (they sample next), and those sequences: one row each, or
        ``1 + len(draft_token_ids)`` rows for a sequence with drafts (its drafts are computed
        after its last token); and the logits of the prompt positions scored this step
        (``PromptLogits``; None when no request asks for prompt log-probabilities)."""
        # decodes by context length: the attention then reads less padding (decode_groups)
        decodes = sorted(((s, n) for s, n in scheduled if n == 1),
                         key=lambda pair: pair[0].num_computed_tokens)
        prefills = [(s, n) for s, n in scheduled if n > 1]
        ordered = decodes + prefills
        ids, positions, slots, last, due, rope_lengths = [], [], [], [], [], []
        scored_rows, spans = [], []  # prompt positions whose logits give prompt logprobs
        bs = self.block_size
        for seq, n in ordered:
            start = seq.num_computed_tokens
            tokens = seq.all_token_ids + seq.draft_token_ids if seq.draft_token_ids \
                else seq.all_token_ids
            first = seq.first_scored_logit
            if first is not None and not seq.output_token_ids:  # logits at p score token p + 1
                lo, hi = max(start, first), min(start + n, seq.num_prompt_tokens - 1)
                if lo < hi:
                    scored_rows += range(len(ids) + lo - start, len(ids) + hi - start)
                    spans.append((seq, lo, hi - lo))
            ids += tokens[start:start + n]
            span = range(start, start + n)
            positions += span
            if self.rope_length_dependent:
                rope_lengths += [max(p + 1, seq.rope_length) for p in span]
            slots += [seq.block_ids[p // bs] * bs + p % bs for p in span]
            if start + n == len(tokens):
                # the last token, and each draft (the sampler checks it against these logits)
                last += range(len(ids) - 1 - len(seq.draft_token_ids), len(ids))
                due.append(seq)
        width = max(len(s.block_ids) for s, _ in ordered)
        tables = torch.full((len(ordered), width), -1, dtype=torch.int32)
        for row, (seq, _) in enumerate(ordered):
            tables[row, :len(seq.block_ids)] = torch.tensor(seq.block_ids, dtype=torch.int32)

        def as_tensor(values):
            return torch.tensor(values, dtype=torch.int32, device=self.device)

        meta = PagedAttentionMetadata(
            self.cache, as_tensor(slots).long(), tables.to(self.device),
            context_lens=as_tensor([s.num_computed_tokens + 1 for s, _ in decodes]) if decodes else None,
            cu_seqlens_q=_cumulative([n for _, n in prefills], self.device) if prefills else None,
            cu_seqlens_k=_cumulative([s.num_computed_tokens + n for s, n in prefills],
                                     self.device) if prefills else None,
            sliding_window=self.sliding_window,
            rope_lengths=torch.tensor([rope_lengths], dtype=torch.long, device=self.device)
            if self.rope_length_dependent else None)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        position_ids = torch.tensor([positions], dtype=torch.long, device=self.device)
        keep = torch.tensor(last + scored_rows, dtype=torch.long, device=self.device)
        if self.loras is not None:
            self.loras.set_batch([s.lora_slot for s, n in ordered for _ in range(n)]
                                 if any(s.lora_slot >= 0 for s, _ in ordered) else None,
                                 self.device)
        logits = self.model(input_ids, position_ids=position_ids, paged=meta, logits_to_keep=keep)[0]
        prompt = PromptLogits(spans, logits[len(last):]) if spans else None
        return logits[:len(last)], due, prompt


@dataclass
class PromptLogits:
    """``logits`` rows of prompt positions, in ``spans`` order: ``(sequence, first position,
    count)``; row ``j`` of a span scores the sequence's prompt token ``first + j + 1``."""

    spans: list[tuple[Sequence, int, int]]
    logits: torch.Tensor


def _cumulative(lengths: list[int], device) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return out.to(device)
