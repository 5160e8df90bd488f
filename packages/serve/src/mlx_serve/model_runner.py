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

from mlx_core.models.paged import PagedAttentionMetadata, PagedKVCache, cache_layout
from mlx_core.rope_scaling import is_length_dependent
from mlx_core.transforms import fuse_projections, prepack_linear_weights, uncopied_mlp_outputs
from mlx_serve.sequence import Sequence


def kv_bytes_per_block(config, block_size: int, dtype: torch.dtype) -> int:
    """Keys and values of every layer for one block."""
    item = torch.empty((), dtype=dtype).element_size()
    heads, dim, shared_values = cache_layout(config)
    return (1 if shared_values else 2) * config.num_layers * block_size * heads * dim * item


logger = logging.getLogger("mlx_serve")


class ModelRunner:
    """Runs the model for the engine. Under tensor parallelism (``parallel``, rank 0's
    ``TensorParallelGroup``) every step's inputs and cache copies go to the other ranks first,
    which run the same forward on their shares (``mlx_serve.tensor_parallel``)."""

    def __init__(self, model: nn.Module, num_blocks: int, block_size: int,
                 prepack_weights: bool = True, fuse: bool = True, parallel=None, *,
                 cache_dtype: torch.dtype | None = None):
        self.model = uncopied_mlp_outputs(model)
        if fuse:
            fuse_projections(model)
        # on CPU in fp32 only; elsewhere nothing is packed (0 bytes)
        self.packed_bytes = prepack_linear_weights(model) if prepack_weights else 0
        if self.packed_bytes:
            logger.info("prepacked the linear weights for CPU inference (%.0f MiB more memory; "
                        "prepack_weights=False to save it)", self.packed_bytes / 2**20)
        self.device, self.dtype = model.device, model.dtype
        self.cache = PagedKVCache(model.config, num_blocks, block_size,
                                  dtype=cache_dtype or self.dtype, device=self.device)
        self.block_size = block_size
        self.sliding_window = model.config.sliding_window
        self.rope_length_dependent = (model.config.position_kind == "rope"
                                      and is_length_dependent(model.config.rope_scaling))
        self.loras = None  # the engine's LoraManager, if any adapter may be used
        self.parallel = parallel

    def execute(self, scheduled: list[tuple[Sequence, int]],
                copies: list[tuple[int, int, int]] = ()
                ) -> tuple[torch.Tensor, list[Sequence], PromptLogits | None]:
        """Copy ``copies`` (``(source block, destination block, tokens)``, shared prefixes up to
        the middle of a block), then run ``(sequence, num_new_tokens)`` pairs; return logits
        for the sequences whose new tokens reach their end (they sample next), and those
        sequences: one row each, or ``1 + len(draft_token_ids)`` rows for a sequence with drafts
        (its drafts are computed after its last token); and the logits of the prompt positions
        scored this step (``PromptLogits``; None when no request asks for prompt
        log-probabilities)."""
        inputs, due, num_last, spans = self.prepare(scheduled)
        copies = list(copies)
        if self.parallel is None:
            logits = self.run(copies, inputs)
        else:
            try:
                self.parallel.send(("step", copies, inputs))
                logits = self.run(copies, inputs)
            except RuntimeError as e:  # a collective failed: a worker that died says so
                raise self.parallel.explained(e) from e
        prompt = PromptLogits(spans, logits[num_last:]) if spans else None
        return logits[:num_last], due, prompt

    def prepare(self, scheduled: list[tuple[Sequence, int]]
                ) -> tuple[StepInputs, list[Sequence], int, list]:
        """The step's packed inputs, the sequences due a token, how many logit rows they take,
        and the prompt-logprob spans."""
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
            return torch.tensor(values, dtype=torch.int32)

        inputs = StepInputs(
            input_ids=torch.tensor([ids], dtype=torch.long),
            position_ids=torch.tensor([positions], dtype=torch.long),
            slots=as_tensor(slots).long(), block_tables=tables,
            context_lens=as_tensor([s.num_computed_tokens + 1 for s, _ in decodes])
            if decodes else None,
            cu_seqlens_q=_cumulative([n for _, n in prefills]) if prefills else None,
            cu_seqlens_k=_cumulative([s.num_computed_tokens + n for s, n in prefills])
            if prefills else None,
            rope_lengths=torch.tensor([rope_lengths], dtype=torch.long)
            if self.rope_length_dependent else None,
            keep=torch.tensor(last + scored_rows, dtype=torch.long),
            lora_slots=[s.lora_slot for s, n in ordered for _ in range(n)]
            if any(s.lora_slot >= 0 for s, _ in ordered) else None)
        return inputs, due, len(last), spans

    @torch.inference_mode()
    def run(self, copies: list[tuple[int, int, int]], inputs: StepInputs) -> torch.Tensor:
        """The cache copies, then the forward over ``inputs``: the kept rows' logits."""
        for source, destination, num_tokens in copies:
            self.cache.copy_tokens(source, destination, num_tokens)

        def moved(tensor):
            return None if tensor is None else tensor.to(self.device)

        meta = PagedAttentionMetadata(
            self.cache, moved(inputs.slots), moved(inputs.block_tables),
            context_lens=moved(inputs.context_lens), cu_seqlens_q=moved(inputs.cu_seqlens_q),
            cu_seqlens_k=moved(inputs.cu_seqlens_k), sliding_window=self.sliding_window,
            rope_lengths=moved(inputs.rope_lengths))
        if self.loras is not None:
            self.loras.set_batch(inputs.lora_slots, self.device)
        return self.model(moved(inputs.input_ids), position_ids=moved(inputs.position_ids),
                          paged=meta, logits_to_keep=moved(inputs.keep))[0]

    def embed(self, token_lists: list[list[int]], pooling: str) -> torch.Tensor:
        """``mlx_serve.embedding.embed`` on the base model (on every rank under tensor
        parallelism)."""
        from mlx_serve.embedding import embed

        if self.parallel is not None:
            self.parallel.send(("embed", token_lists, pooling))
        if self.loras is not None:
            self.loras.set_batch(None, self.device)  # the base model, whatever ran before
        return embed(self.model, token_lists, pooling)


@dataclass
class StepInputs:
    """One step's packed row and its paged-attention metadata (host tensors: what rank 0 sends
    the other tensor-parallel ranks)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    slots: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor | None
    cu_seqlens_q: torch.Tensor | None
    cu_seqlens_k: torch.Tensor | None
    rope_lengths: torch.Tensor | None
    keep: torch.Tensor
    lora_slots: list[int] | None


@dataclass
class PromptLogits:
    """``logits`` rows of prompt positions, in ``spans`` order: ``(sequence, first position,
    count)``; row ``j`` of a span scores the sequence's prompt token ``first + j + 1``."""

    spans: list[tuple[Sequence, int, int]]
    logits: torch.Tensor


def _cumulative(lengths: list[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return out
