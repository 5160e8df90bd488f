"""The Learner against hand-written torch loops: same data order, same optimizer, same weights."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mlx_train import CausalLMLoss, DataLoaders, Learner

from .helpers import MLP, classification_data, loader_like, make_dls, make_learner, two_groups


def _split_decay(model):
    norms = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    decay = [p for n, p in model.named_parameters() if not n.endswith("bias") and id(p) not in norms]
    keep = [p for n, p in model.named_parameters() if n.endswith("bias") or id(p) in norms]
    return decay, keep


def _train_hand(model, dls, opt, epochs, seed=0, set_hypers=None):
    """Iterate the same seeded loader across epochs, as DataLoaders.from_dsets(seed=...) does."""
    loader = loader_like(dls, seed)
    step = 0
    for _ in range(epochs):
        model.train()
        for xb, yb in loader:
            if set_hypers:
                set_hypers(opt, step)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            opt.zero_grad()
            step += 1
        # the learner's validation pass draws a base seed from the global RNG, which does not
        # touch the seeded loader: nothing to mirror here
    return model


def _same(a: nn.Module, b: nn.Module, atol=0.0):
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, atol=atol, rtol=0), f"{n} differs by {(p - q).abs().max()}"


def test_fit_equals_hand_loop_with_adamw_and_true_weight_decay():
    torch.manual_seed(0)
    ours, ref = MLP(), MLP()
    ref.load_state_dict(ours.state_dict())
    dls = make_dls(seed=0)
    learn = make_learner(ours, dls, lr=1e-2, wd=0.1)
    learn.fit(3)
    decay, keep = _split_decay(ref)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": keep, "weight_decay": 0.0}], lr=1e-2)
    _train_hand(ref, dls, opt, 3)
    _same(ours, ref)  # bit for bit


def test_default_weight_decay_is_the_optimizers_and_skips_norms_and_biases():
    learn = make_learner(lr=1e-2)
    learn.create_opt()
    groups = learn.opt.param_groups
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]  # AdamW's default, then no decay
    names = {id(p): n for n, p in learn.model.named_parameters()}
    assert sorted(names[id(p)] for p in groups[1]["params"]) == [
        "body.0.bias", "body.1.bias", "body.1.weight", "head.bias"]
    learn = make_learner(wd_bn_bias=True)
    learn.create_opt()
    assert len(learn.opt.param_groups) == 1


def test_discriminative_lrs_equal_hand_loop_with_param_groups():
    torch.manual_seed(1)
    ours, ref = MLP(), MLP()
    ref.load_state_dict(ours.state_dict())
    dls = make_dls(seed=0)
    learn = make_learner(ours, dls, splitter=two_groups, wd=0.0)
    learn.fit(2, lr=slice(1e-3, 1e-1))
    assert [h["lr"] for h in learn.opt.hypers] == pytest.approx([1e-3, 1e-1], rel=1e-12)
    opt = torch.optim.AdamW([{"params": list(ref.body.parameters()), "lr": 1e-3},
                             {"params": list(ref.head.parameters()), "lr": 1e-1}], weight_decay=0.0)
    _train_hand(ref, dls, opt, 2)
    _same(ours, ref)


def test_lr_slices_spread_geometrically_like_fastai():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    learn = make_learner(model, splitter=lambda m: list(m.children()))
    learn.create_opt()
    learn.opt.set_hyper("lr", slice(1e-4, 1e-1))
    assert [h["lr"] for h in learn.opt.hypers] == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1], rel=1e-12)
    learn.opt.set_hyper("lr", slice(1e-2))  # fastai: stop/10 for all but the last group
    assert [h["lr"] for h in learn.opt.hypers] == pytest.approx([1e-3, 1e-3, 1e-3, 1e-2])
    learn.opt.set_hyper("lr", [1, 2, 3, 4])
    assert [h["lr"] for h in learn.opt.hypers] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="got 3 values for lr but the optimizer has 4 layer groups"):
        learn.opt.set_hyper("lr", [1, 2, 3])


def test_bad_input_gets_clear_errors():
    learn = make_learner()
    with pytest.raises(ValueError, match="single layer group"):
        learn.fit(1, lr=slice(1e-4, 1e-2))
    stranger = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="not in the model"):
        make_learner(splitter=lambda m: [list(stranger.parameters())]).create_opt()
    with pytest.raises(ValueError, match="splitter groups 0 and 1"):
        make_learner(splitter=lambda m: [m.head, m.head.parameters()]).create_opt()
    with pytest.raises(ValueError, match="group 1 is empty"):
        make_learner(splitter=lambda m: [m.head, []]).create_opt()
    no_valid = DataLoaders.from_dsets(classification_data(), bs=16)
    with pytest.raises(ValueError, match="fit needs a validation set"):
        make_learner(dls=no_valid).fit(1)
    with pytest.raises(ValueError, match="no loss function"):
        Learner(make_dls(), MLP())
    with pytest.raises(ValueError, match="start_epoch must be in"):
        learn.fit(2, start_epoch=3)


def test_freeze_keeps_norm_layers_training_and_unfreeze_resets_state():
    torch.manual_seed(2)
    learn = make_learner(splitter=two_groups, lr=1e-2)
    learn.freeze()
    body = learn.model.body
    assert [p.requires_grad for p in body.parameters()] == [False, False, True, True]  # LN trains
    assert all(p.requires_grad for p in learn.model.head.parameters())
    before = {n: p.detach().clone() for n, p in learn.model.named_parameters()}
    learn.fit(1)
    changed = {n for n, p in learn.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"body.1.weight", "body.1.bias", "head.weight", "head.bias"}
    assert learn.opt.state  # Adam moments exist
    learn.unfreeze()
    assert all(p.requires_grad for p in learn.model.parameters()) and not learn.opt.state
    learn = make_learner(splitter=two_groups, train_bn=False)
    learn.freeze()
    assert not any(p.requires_grad for p in learn.model.body.parameters())
    with pytest.warns(UserWarning, match="freezes all 2 layer groups"):
        learn.freeze_to(5)


def test_validate_get_preds_and_predict_match_a_manual_pass():
    from mlx_train import accuracy

    learn = make_learner(metrics=accuracy, lr=1e-2)
    learn.dls.vocab = ["a", "b", "c"]
    learn.fit(1)
    x, y = learn.dls.valid.dataset.tensors
    learn.model.eval()
    with torch.no_grad():
        logits = learn.model(x)
    loss, acc = learn.validate()
    assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert acc == pytest.approx((logits.argmax(-1) == y).float().mean().item())
    inp, preds, targs, dec = learn.get_preds(with_input=True, with_decoded=True)
    assert torch.equal(inp, x) and torch.equal(targs, y)
    assert torch.allclose(preds, logits.softmax(-1), atol=1e-6)
    assert torch.equal(dec, logits.argmax(-1))
    raw, _ = learn.get_preds(act=lambda t: t)
    assert torch.allclose(raw, logits, atol=1e-6)
    label, decoded, probs = learn.predict(x[3])
    assert int(decoded) == int(logits[3].argmax()) and label == "abc"[int(decoded)]
    assert torch.allclose(probs, logits[3].softmax(-1), atol=1e-6)
    assert learn.recorder.values and len(learn.recorder.values) == 1  # validate() logs nothing


def test_zoo_transformer_gets_a_causal_lm_loss_equal_to_its_own():
    from torch.utils.data import TensorDataset

    from mlx_core import build_model, get_preset

    torch.manual_seed(0)
    model = build_model(get_preset("tiny-llama"))
    ids = torch.randint(0, 128, (8, 12))
    dls = DataLoaders.from_dsets(TensorDataset(ids, ids), TensorDataset(ids[:4], ids[:4]), bs=4)
    learn = Learner(dls, model, progress=False)
    assert isinstance(learn.loss_func, CausalLMLoss)
    with torch.no_grad():
        ours = learn.loss_func(model(ids), ids)
        theirs = model(ids, labels=ids)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    learn.fit(1, lr=1e-3)
    assert learn.recorder.values[0][1] is not None


def test_loss_func_from_model_attribute():
    model = MLP()
    model.loss_func = nn.CrossEntropyLoss(label_smoothing=0.1)
    assert Learner(make_dls(), model, progress=False).loss_func is model.loss_func
