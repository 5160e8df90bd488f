"""Selective recompute (``mlx_core.transforms.selective_recompute``, on mlx_core.models.recompute):
the MLPs' hidden activation and the norm outputs are rebuilt in backward instead of saved, with
the same gradients bit for bit, the activations freed after the forward, and nothing of them
inside layers that gradient checkpointing already recomputes. The zoo model alone keeps them;
whoever trains applies the transform."""

import gc
import weakref

import pytest
import torch

import mlx_core.transforms.recompute as recomputing
from mlx_core import build_model, get_preset
from mlx_core.models import recompute
from mlx_core.transforms import selective_recompute


def _model(preset):
    torch.manual_seed(0)
    return selective_recompute(build_model(get_preset(preset)).train())


def _hidden_refs(model):
    """Weak references to each MLP's hidden activation (down_proj's input) of the next forward."""
    refs = []
    for layer in model.model.layers:
        layer.mlp.down_proj.register_forward_pre_hook(lambda _, args: refs.append(weakref.ref(args[0])))
    return refs


def _train_step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids)
    gc.collect()
    return loss


def _rebuilt_vs_kept(model, refs, monkeypatch):
    """A training step with the rebuilds, then one keeping every activation: their losses and
    gradients equal bit for bit; returns, per step, which of ``refs``' activations were still
    alive after the forward."""
    ids = torch.randint(0, 100, (2, 12))
    results = []
    for rebuild in (True, False):
        if not rebuild:
            monkeypatch.setattr(recomputing, "worth_recomputing", lambda tensor: False)
        refs.clear()
        loss = _train_step(model, ids)
        kept = [r() is not None for r in refs]
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((kept, loss.detach(), grads))
    (_, loss_a, grads_a), (_, loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    return results[0][0], results[1][0]


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("lora", [False, True])
def test_same_gradients_and_the_hidden_activation_is_not_kept(preset, lora, monkeypatch):
    torch.manual_seed(0)
    model = base = build_model(get_preset(preset)).train()
    if not lora:
        selective_recompute(base)
    else:  # wraps base's linear layers in place, and applies selective recompute
        from mlx_adapters import LoraConfig, get_peft_model

        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    kept_a, kept_b = _rebuilt_vs_kept(model, _hidden_refs(base), monkeypatch)
    n_layers = len(base.model.layers)
    assert kept_a == [False] * n_layers  # freed after the forward: only its recipe is held
    assert kept_b == [True] * n_layers  # saved for down_proj's backward


def test_checkpointed_layers_keep_no_recipe(monkeypatch):
    model = _model("tiny-llama")
    ids = torch.randint(0, 100, (2, 12))
    _train_step(model, ids).backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    recipes = []
    real = recompute.recompute_when_saved
    monkeypatch.setattr(recomputing, "recompute_when_saved",
                        lambda *a: recipes.append(recompute.recomputing_layer()) or real(*a))
    model.gradient_checkpointing_enable(num_layers=1)
    _train_step(model, ids).backward()
    # layer 0 is checkpointed (its forward and its recompute keep no recipe); the others keep
    # three each (two norm outputs, the MLP's hidden activation)
    assert recipes == [False] * 3 * (len(model.model.layers) - 1)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], atol=1e-6, rtol=1e-5)


def test_inference_and_frozen_paths_are_untouched():
    model = build_model(get_preset("tiny-llama")).eval()
    ids = torch.randint(0, 100, (1, 8))
    hidden = torch.randn(3, requires_grad=True)
    with torch.no_grad():
        assert not recompute.worth_recomputing(hidden * 2)
    assert recompute.worth_recomputing(hidden * 2)
    assert not recompute.worth_recomputing(hidden.detach() * 2)
    with torch.inference_mode():
        model(ids)  # no hooks installed, no error


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_norm_outputs_are_rebuilt_too(preset, monkeypatch):
    """Each layer's two norm outputs (read by q/k/v and by the MLP's input projections) are freed
    after the forward and rebuilt in backward: the same gradients bit for bit."""
    model = _model(preset)
    refs = []
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.register_forward_hook(lambda _m, _a, out: refs.append(weakref.ref(out)))
    kept_a, kept_b = _rebuilt_vs_kept(model, refs, monkeypatch)
    n_norms = 2 * len(model.model.layers)
    assert kept_a == [False] * n_norms and kept_b == [True] * n_norms


def test_the_zoo_model_alone_keeps_its_activations_and_the_transform_is_idempotent():
    torch.manual_seed(0)
    model = build_model(get_preset("tiny-llama")).train()
    refs = _hidden_refs(model)
    loss = _train_step(model, torch.randint(0, 100, (2, 12)))
    assert all(r() is not None for r in refs)  # plain: down_proj keeps its input
    del loss
    selective_recompute(selective_recompute(model))
    assert type(model.model.layers[0].mlp) is recomputing.RecomputingGatedMLP
    assert type(model.model.layers[0]) is recomputing.RecomputingDecoderLayer
    assert set(model.state_dict()) == set(build_model(get_preset("tiny-llama")).state_dict())


def test_training_entry_points_apply_it():
    from mlx_adapters import LoraConfig, get_peft_model
    from mlx_train.recipes.components import preset_model
    from mlx_train.text import load_lm

    peft = get_peft_model(build_model(get_preset("tiny-llama")), LoraConfig(r=2, target_modules=["q_proj"]))
    for model in (preset_model("tiny-gpt2"), load_lm("tiny-llama")[0], peft.base_model.model):
        assert isinstance(model.model.layers[0], recomputing.RecomputingDecoderLayer)
