"""Shared steps of the adapter tests."""

import torch
import transformers

TINY_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)


def save_tiny_llama(path, **config):
    """A tiny random HF Llama (``TINY_LLAMA`` updated with ``config``), drawn after
    ``torch.manual_seed(0)`` and saved at ``path``; returns ``path``."""
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY_LLAMA, **config})).save_pretrained(path)
    return path


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
