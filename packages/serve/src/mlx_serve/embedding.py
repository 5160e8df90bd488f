"""Embeddings from the zoo's decoders, as vLLM's pooling runner gives them: each input's final
hidden states (after the model's last norm) pooled to one vector, the last token's (``last``,
what decoder embedding models are trained for) or the mean over its tokens (``mean``), then
L2-normalised. Inputs are batched by length (right-padded; a causal model's real tokens never
see the padding after them); with a RoPE whose table depends on the length (dynamic NTK,
LongRoPE), only inputs of one table share a batch, so each input gets its own length's."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mlx_core.rope_scaling import table_key

POOLINGS = ("last", "mean")


def check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of: {', '.join(POOLINGS)}")
    return pooling


@torch.inference_mode()
def embed(model: nn.Module, token_lists: Sequence[Sequence[int]], pooling: str = "last",
          batch_size: int = 16) -> torch.Tensor:
    """``[len(token_lists), hidden]`` fp32 unit vectors, one per token list (each non-empty)."""
    check_pooling(pooling)
    device = model.device
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    pooled = torch.empty(len(token_lists), model.config.hidden_size, device=device)
    config = model.config
    tables = [table_key(config.rope_scaling if config.position_kind == "rope" else None,
                        config.max_position_embeddings, len(token_lists[i])) for i in order]
    batches, start = [], 0
    while start < len(order):  # a batch ends at batch_size rows or where the table changes
        end = start + 1
        while end < min(len(order), start + batch_size) and tables[end] == tables[start]:
            end += 1
        batches.append(order[start:end])
        start = end
    for rows in batches:
        lengths = torch.tensor([len(token_lists[i]) for i in rows], device=device)
        ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(rows):
            ids[row, :len(token_lists[i])] = torch.tensor(list(token_lists[i]), device=device)
            mask[row, :len(token_lists[i])] = 1
        hidden = model.model(ids, attention_mask=mask).float()  # the backbone: norm included
        if pooling == "last":
            vectors = hidden[torch.arange(len(rows), device=device), lengths - 1]
        else:
            vectors = (hidden * mask[..., None]).sum(dim=1) / lengths[:, None]
        pooled[rows] = F.normalize(vectors, dim=-1)
    return pooled
