"""Next tokens for a batch of sequences, each with its own ``SamplingParams``.

Order per row: penalties, then greedy (argmax) or temperature, top-k, top-p and min-p, then a
draw. Draws use the exponential race (``argmax(p / E)`` with ``E ~ Exp(1)``, equivalent to
sampling from ``p``). A seeded request's noise for its i-th output token comes from a generator
seeded by (seed, i): it gives the same tokens whatever else is in the batch, and whether or not
that token was drafted.

Speculative drafts (``Sequence.draft_token_ids``) are verified here: a sequence with ``d``
drafts has ``d + 1`` rows, the i-th holding the distribution after its tokens and its first ``i``
drafts. Each row's token is drawn as above; a draft is kept while it equals its row's token, and
the first row whose token differs (or the last row) gives one more. So every token is exactly the
one decoding without drafts draws (same distribution; greedy: the same argmax); a draft is kept
with probability ``p(draft)``, as speculative sampling's rejection rule keeps a single-token draft.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mlx_core.models.sampling import filter_logits
from mlx_serve.sequence import Sequence
from mlx_serve.structured import mask_disallowed


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
    params = [s.params for s in seqs]
    return filter_logits(logits, [p.temperature for p in params], [p.top_k for p in params],
                         [p.top_p for p in params], [p.min_p for p in params])


def _mask_stops_before_min_tokens(logits: torch.Tensor, seqs: list[Sequence],
                                  eos_token_ids: list[int]) -> None:
    for row, seq in enumerate(seqs):
        p = seq.params
        if len(seq.output_token_ids) < p.min_tokens:
            stops = list(p.stop_token_ids) + ([] if p.ignore_eos else eos_token_ids)
            if stops:
                logits[row, stops] = float("-inf")


class _Row:
    """A sequence as one of its draft rows sees it: its first drafts taken as its tokens."""

    def __init__(self, seq: Sequence, drafts: list[int]):
        self.params, self.seed = seq.params, seq.seed
        self.all_token_ids = seq.all_token_ids + drafts
        self.output_token_ids = seq.output_token_ids + drafts


def _rows(seqs: list[Sequence]) -> list:
    rows = []
    for seq in seqs:
        rows.append(seq)
        rows += [_Row(seq, seq.draft_token_ids[:i]) for i in range(1, len(seq.draft_token_ids) + 1)]
    return rows


class Sampler:
    def __init__(self, eos_token_ids: list[int], seed: int = 0):
        self.eos_token_ids = eos_token_ids  # the engine's own list, not a copy
        self.generator = torch.Generator().manual_seed(seed)  # for unseeded requests
        self.grammar_seconds = 0.0  # spent masking constrained rows (structured outputs)

    def _noise_source(self, row) -> torch.Generator:
        if row.seed is None:
            return self.generator
        # the row's output index keys the noise: the same token whatever the batch or drafts
        return torch.Generator().manual_seed(hash((row.seed, len(row.output_token_ids))) % 2**63)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[list[SampledToken]]:
        """The new tokens of each sequence: its kept drafts, then one token of its own."""
        rows = _rows(seqs)
        raw = logits.float()
        logits = apply_penalties(raw.clone(), rows)
        _mask_stops_before_min_tokens(logits, rows, self.eos_token_ids)
        guided = [i for i, r in enumerate(rows) if getattr(r, "guide", None) is not None]
        if guided:  # constrained rows (never drafted): what their grammar forbids is -inf
            started = time.perf_counter()
            mask_disallowed(logits, guided, [rows[i].guide for i in guided])
            self.grammar_seconds += time.perf_counter() - started
        tokens = logits.argmax(dim=-1)
        sampling = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampling:
            picked = torch.tensor(sampling, device=logits.device)
            probs = _filter(logits[picked], [rows[i] for i in sampling]).softmax(dim=-1)
            noise = torch.empty_like(probs)
            for j, i in enumerate(sampling):
                noise[j].exponential_(generator=self._noise_source(rows[i]))
            tokens[picked] = (probs / noise).argmax(dim=-1)
        row_tokens = tokens.tolist()
        out, used = [], []  # per sequence: its tokens; the rows they came from
        start = 0
        for seq in seqs:
            drafts, kept = seq.draft_token_ids, []
            for i in range(len(drafts) + 1):
                kept.append(SampledToken(row_tokens[start + i]))
                used.append(start + i)
                if i == len(drafts) or row_tokens[start + i] != drafts[i]:
                    break
            out.append(kept)
            start += len(drafts) + 1
        wants_logprobs = [i for i in used if rows[i].params.logprobs is not None]
        if wants_logprobs:
            logprobs = torch.log_softmax(raw[wants_logprobs], dim=-1)
            by_row = {i: token for i, token in zip(used, (t for ts in out for t in ts),
                                                       strict=True)}
            for j, i in enumerate(wants_logprobs):
                token = by_row[i]
                token.logprob = float(logprobs[j, token.token_id])
                k = rows[i].params.logprobs
                if k:
                    values, ids = logprobs[j].topk(k)
                    token.top_logprobs = dict(zip(ids.tolist(), values.tolist(), strict=True))
        return out
