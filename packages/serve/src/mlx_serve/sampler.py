"""Next tokens for a batch of sequences, each with its own ``SamplingParams``.

Order per row: penalties, then greedy (argmax) or temperature, top-k, top-p and min-p, then a
draw. Draws use the exponential race (``argmax(p / E)`` with ``E ~ Exp(1)``, equivalent to
sampling from ``p``) with noise from the row's own generator when the request is seeded, so a
seeded request gives the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlx_serve.sequence import Sequence


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None = None  # of the model's raw distribution
    top_logprobs: dict[int, float] | None = None


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition (over prompt and output), frequency and presence (over output) penalties."""
    for row, seq in enumerate(seqs):
        p = seq.params
        if not p.needs_penalties:
            continue
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(seq.all_token_ids, dtype=torch.long, device=logits.device).unique()
            values = logits[row, seen]
            logits[row, seen] = torch.where(values > 0, values / p.repetition_penalty,
                                            values * p.repetition_penalty)
        if seq.output_token_ids and (p.frequency_penalty or p.presence_penalty):
            out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return logits


def _filter(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p for rows that sample; all rows at once."""
    device = logits.device
    temperature = torch.tensor([s.params.temperature for s in seqs], device=device)
    logits = logits / temperature[:, None]
    top_k = [s.params.top_k for s in seqs]
    top_p = [s.params.top_p for s in seqs]
    if any(0 < k < logits.shape[1] for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        vocab = logits.shape[1]
        k = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=device)
        ranks = torch.arange(vocab, device=device)[None, :]
        remove = ranks >= k[:, None]
        probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
        # drop a token when the ones ranked above it already hold top_p of the mass
        before = probs.cumsum(dim=-1) - probs
        p = torch.tensor(top_p, device=device)[:, None]
        remove |= (before >= p) & (p < 1.0)  # at p=1 float rounding must not drop the tail
        remove[:, 0] = False  # always keep the most likely token
        logits = torch.full_like(logits, float("-inf")).scatter(
            1, order, sorted_logits.masked_fill(remove, float("-inf")))
    min_p = torch.tensor([s.params.min_p for s in seqs], device=device)
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def _mask_stops_before_min_tokens(logits: torch.Tensor, seqs: list[Sequence],
                                  eos_token_ids: list[int]) -> None:
    for row, seq in enumerate(seqs):
        p = seq.params
        if len(seq.output_token_ids) < p.min_tokens:
            stops = list(p.stop_token_ids) + ([] if p.ignore_eos else eos_token_ids)
            if stops:
                logits[row, stops] = float("-inf")


class Sampler:
    def __init__(self, eos_token_ids: list[int], seed: int = 0):
        self.eos_token_ids = eos_token_ids  # the engine's own list, not a copy
        self.generator = torch.Generator().manual_seed(seed)  # for unseeded requests

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampledToken]:
        raw = logits.float()
        logits = apply_penalties(raw.clone(), seqs)
        _mask_stops_before_min_tokens(logits, seqs, self.eos_token_ids)
        tokens = logits.argmax(dim=-1)
        sampling = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampling:
            rows = torch.tensor(sampling, device=logits.device)
            probs = _filter(logits[rows], [seqs[i] for i in sampling]).softmax(dim=-1)
            noise = torch.empty_like(probs)
            for j, i in enumerate(sampling):
                noise[j].exponential_(generator=seqs[i].generator or self.generator)
            tokens[rows] = (probs / noise).argmax(dim=-1)
        token_ids = tokens.tolist()
        wants_logprobs = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        out = [SampledToken(t) for t in token_ids]
        if wants_logprobs:
            logprobs = torch.log_softmax(raw[wants_logprobs], dim=-1)
            for j, i in enumerate(wants_logprobs):
                out[i].logprob = float(logprobs[j, token_ids[i]])
                k = seqs[i].params.logprobs
                if k:
                    values, ids = logprobs[j].topk(k)
                    out[i].top_logprobs = dict(zip(ids.tolist(), values.tolist(), strict=True))
        return out
