"""Shared steps of the adapter tests."""

import warnings

import pytest
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


def loss_and_grads_under_autocast(model, ids, enabled: bool = True) -> tuple[float, dict]:
    """One training forward and backward under ``torch.autocast`` (bf16, as HF Trainer's
    ``bf16=True``): the loss, and the gradient of each trainable parameter by its name without
    the adapter's (``.default``), so ours and PEFT's compare by name."""
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
        out = model(ids, labels=ids)
    loss = out if torch.is_tensor(out) else out.loss
    loss.backward()
    return loss.item(), {n.replace(".default", ""): p.grad for n, p in model.named_parameters()
                         if p.requires_grad}


def assert_base_restored(peft_model, before: dict) -> None:
    """After unmerging, every base weight is back to ``before`` bit for bit (names without the
    wrapper)."""
    restored = peft_model.base_model.model.state_dict()
    for name, tensor in before.items():
        module, _, leaf = name.rpartition(".")
        key = name if name in restored else f"{module}.base_layer.{leaf}"
        assert torch.equal(restored[key], tensor), name


def left_padded_batch():
    """Generate inputs: two prompts of 7 and 4 tokens, left-padded with 0, and their mask."""
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


def peft_reads_transformers_cache() -> bool:
    """Whether the installed PEFT (0.22 on) finds generate's cache under transformers' own name
    (``cache`` in transformers 5), so that its prompt-learning ``generate`` is right on its own."""
    try:
        from peft.import_utils import get_transformers_cache_name  # noqa: F401
    except ImportError:
        return False
    return True


def hf_peft_generate(hf_peft_model, **options):
    """HF PEFT's own ``generate``. Before PEFT 0.22, with one rename: its
    ``prepare_inputs_for_generation`` looks for generate's cache under ``past_key_values``, which
    transformers 5 calls ``cache``, so on its own it adds a prompt's virtual tokens again at every
    step and loses a prefix (its tokens differ from its own forward's). There each step's inputs
    reach PEFT's logic with the cache under the old name; everything else (mask, positions,
    injection) is PEFT's. PEFT 0.22 reads the cache under transformers' own name
    (``peft.import_utils.get_transformers_cache_name``), and the rename would hide it."""
    rename = not peft_reads_transformers_cache()
    base = hf_peft_model.base_model
    original = hf_peft_model.base_model_prepare_inputs_for_generation

    def cache_as_past_key_values(*args, **kwargs):
        inputs = original(*args, **kwargs)
        if "cache" in inputs and "past_key_values" not in inputs:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    if rename:
        hf_peft_model.base_model_prepare_inputs_for_generation = cache_as_past_key_values
    try:
        with torch.no_grad(), warnings.catch_warnings():  # PEFT's notes on the renamed arguments
            warnings.filterwarnings("ignore", "Position ids are not supported")
            warnings.filterwarnings("ignore", "`past_key_values` is deprecated")
            return hf_peft_model.generate(**options)
    finally:
        if rename:
            hf_peft_model.base_model_prepare_inputs_for_generation = original
            base.prepare_inputs_for_generation = original


def assert_prompt_generate_refusals(ours, zoo, zoo_fix: str) -> None:
    """What ``generate`` with an active prompt-learning adapter refuses, each error naming the
    fix: ``inputs_embeds``, a static cache (the step wrapper is put back after the error), and a
    zoo model (``zoo_fix``: the way its message points to)."""
    ids, mask = left_padded_batch()
    with pytest.raises(ValueError, match="takes input_ids, not inputs_embeds"):
        ours.generate(inputs_embeds=ours.base_model.model.get_input_embeddings()(ids), max_new_tokens=2)
    with pytest.raises(ValueError, match="2-D attention mask.*default dynamic cache"):
        ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0,
                      cache_implementation="static")
    assert "prepare_inputs_for_generation" not in vars(ours.base_model.model)  # put back
    with pytest.raises(ValueError, match=zoo_fix):
        zoo.generate(ids)


def assert_trains_saves_and_merges(quantized_base, frozen_suffix: str, ids, path):
    """LoRA over ``quantized_base()`` (a fresh quantized model per call): training moves the loss
    and only the adapter (the buffers ending in ``frozen_suffix`` stay as they were); the saved
    adapter reloads onto a fresh base with the same output; merging keeps it. Returns the merged
    model for the caller's own checks."""
    from mlx_adapters import LoraConfig, PeftModel, get_peft_model

    model = get_peft_model(quantized_base(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    frozen = {n: b.clone() for n, b in model.named_buffers() if n.endswith(frozen_suffix)}
    losses = train_losses(model, ids, steps=8)
    assert losses[-1] < losses[0] - 0.1
    assert frozen and all(torch.equal(b, frozen[n]) for n, b in model.named_buffers() if n in frozen)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        adapted = model(ids)
    model.save_pretrained(path)
    reloaded = PeftModel.from_pretrained(quantized_base(), path).eval()
    with torch.no_grad():
        assert (reloaded(ids) - adapted).abs().max() < 1e-5
        merged = reloaded.merge_and_unload()
        assert (merged(ids) - adapted).abs().max() < 1e-5
    return merged
