"""Shared steps of the adapter tests."""

import torch


def train_losses(model, ids, steps: int, lr: float = 1e-2) -> list[float]:
    """AdamW on the trainable parameters, next-token loss on ``ids``; the loss of each step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def assert_base_restored(peft_model, before: dict) -> None:
    """After unmerging, every base weight is back to ``before`` bit for bit (names without the
    wrapper)."""
    restored = peft_model.base_model.model.state_dict()
    for name, tensor in before.items():
        module, _, leaf = name.rpartition(".")
        key = name if name in restored else f"{module}.base_layer.{leaf}"
        assert torch.equal(restored[key], tensor), name
