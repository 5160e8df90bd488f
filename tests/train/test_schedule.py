"""Schedules against fastai's formulas (written out here), 1cycle / flat-cos / fine_tune against
hand loops, and the lr finder."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlx_train import Callback, SchedCos, SchedExp, SchedLin, SchedNo, SchedPoly, combine_scheds
from mlx_train.schedule import combined_cos, minimum, steep, valley

from .helpers import MLP, loader_like, make_dls, make_learner, two_groups


def f_cos(a, b, pos):
    return a + (1 + math.cos(math.pi * (1 - pos))) * (b - a) / 2


def f_one_cycle(pos, lr_max, div=25.0, div_final=1e5, pct=0.25):
    if pos < pct:
        return f_cos(lr_max / div, lr_max, pos / pct)
    return f_cos(lr_max, lr_max / div_final, (pos - pct) / (1 - pct))


def f_moms(pos, moms=(0.95, 0.85, 0.95), pct=0.25):
    return f_cos(moms[0], moms[1], pos / pct) if pos < pct else f_cos(moms[1], moms[2], (pos - pct) / (1 - pct))


@pytest.mark.parametrize("pos", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_schedule_formulas(pos):
    assert SchedLin(2.0, 10.0)(pos) == pytest.approx(2 + pos * 8)
    assert SchedCos(2.0, 10.0)(pos) == pytest.approx(f_cos(2, 10, pos))
    assert SchedNo(2.0, 10.0)(pos) == 2.0
    assert SchedExp(1e-3, 1e-1)(pos) == pytest.approx(1e-3 * 100**pos)
    assert SchedPoly(2.0, 10.0, 0.5)(pos) == pytest.approx(2 + 8 * pos**0.5)
    arr = SchedCos(np.array([1.0, 2.0]), np.array([3.0, 6.0]))(pos)  # one value per layer group
    assert arr == pytest.approx([f_cos(1, 3, pos), f_cos(2, 6, pos)])


def test_combine_scheds_and_combined_cos():
    f = combine_scheds([0.3, 0.7], [SchedLin(0, 1), SchedLin(1, 0)])
    assert [f(p) for p in (0, 0.15, 0.3, 0.65, 1.0)] == pytest.approx([0, 0.5, 1, 0.5, 0])
    g = combined_cos(0.25, 1.0, 10.0, 0.0)
    for pos in np.linspace(0, 1, 13):
        expect = f_cos(1, 10, pos / 0.25) if pos < 0.25 else f_cos(10, 0, (pos - 0.25) / 0.75)
        assert g(pos) == pytest.approx(expect, abs=1e-12)
    with pytest.raises(ValueError, match="sum to 1"):
        combine_scheds([0.5, 0.6], [SchedNo(0, 0), SchedNo(0, 0)])


class Hypers(Callback):
    """Per training batch: the lr and beta1 of every layer group, as the step used them."""

    order = 100

    def __init__(self):
        self.seen = []  # across fits

    def before_step(self):
        self.seen.append([(h["lr"], h["mom"]) for h in self.learn.opt.hypers])


def _positions(n_epoch, n_iter):
    pos = []
    for e in range(n_epoch):
        p = e / n_epoch
        for _ in range(n_iter):
            pos.append(p)
            p += 1 / (n_iter * n_epoch)
    return pos


def test_fit_one_cycle_schedules_lr_and_adam_beta1_and_equals_a_hand_loop():
    torch.manual_seed(0)
    ours, ref = MLP(), MLP()
    ref.load_state_dict(ours.state_dict())
    dls = make_dls(seed=0)
    learn, rec = make_learner(ours, dls, wd=0.0), Hypers()
    learn.fit_one_cycle(3, 1e-2, cbs=rec)
    pos = _positions(3, len(dls.train))
    assert len(rec.seen) == len(pos)
    for (lr, mom), p in zip([s[0] for s in rec.seen], pos, strict=True):
        assert lr == pytest.approx(f_one_cycle(p, 1e-2), rel=1e-9)
        assert mom == pytest.approx(f_moms(p), rel=1e-9)
    assert learn.recorder.hps["lr"] == [s[-1][0] for s in rec.seen]

    opt = torch.optim.AdamW(ref.parameters(), lr=1.0, weight_decay=0.0)

    def set_hypers(step, p=pos):
        for g in opt.param_groups:
            g["lr"], g["betas"] = f_one_cycle(p[step], 1e-2), (f_moms(p[step]), 0.999)

    loader, step = loader_like(dls, 0), 0
    for _ in range(3):
        for xb, yb in loader:
            set_hypers(step)
            F.cross_entropy(ref(xb), yb).backward()
            opt.step()
            opt.zero_grad()
            step += 1
    for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)


def test_fit_flat_cos():
    learn, rec = make_learner(), Hypers()
    learn.fit_flat_cos(2, 1e-2, cbs=rec)
    pos = _positions(2, len(learn.dls.train))
    for (lr, _), p in zip([s[0] for s in rec.seen], pos, strict=True):
        expect = 1e-2 if p < 0.75 else f_cos(1e-2, 1e-7, (p - 0.75) / 0.25)
        assert lr == pytest.approx(expect, rel=1e-9)


def test_fine_tune_follows_fastai():
    torch.manual_seed(0)
    learn, rec = make_learner(splitter=two_groups), Hypers()
    body_w = learn.model.body[0].weight.detach().clone()
    stages = []

    class Stage(Callback):
        def before_fit(self):
            stages.append({"frozen": not self.learn.model.body[0].weight.requires_grad,
                           "n_epoch": self.learn.n_epoch, "start": len(rec.seen)})

    learn.add_cbs([rec, Stage()])
    learn.fine_tune(2, base_lr=2e-3, freeze_epochs=1)
    n = len(learn.dls.train)
    assert [(s["frozen"], s["n_epoch"]) for s in stages] == [(True, 1), (False, 2)]
    first, second = rec.seen[:n], rec.seen[n:]
    # stage 1: slice(base_lr) -> [base_lr/10, base_lr], 1cycle with pct_start 0.99, div 25
    for groups, p in zip(first, _positions(1, n), strict=True):
        for (lr, _), top in zip(groups, [2e-4, 2e-3], strict=True):
            assert lr == pytest.approx(f_one_cycle(p, top, pct=0.99), rel=1e-9)
    # stage 2: base_lr halved, slice(base_lr/lr_mult, base_lr), pct_start 0.3, div 5
    for groups, p in zip(second, _positions(2, n), strict=True):
        for (lr, _), top in zip(groups, [1e-5, 1e-3], strict=True):
            assert lr == pytest.approx(f_one_cycle(p, top, div=5.0, pct=0.3), rel=1e-9)
    assert not torch.equal(body_w, learn.model.body[0].weight)  # trained in stage 2
    steps = {int(s["step"]) for s in learn.opt.state.values()}
    assert steps == {2 * n}  # unfreeze() cleared the optimizer state


def test_fine_tune_with_one_layer_group_uses_base_lr():
    learn, rec = make_learner(), Hypers()
    learn.fine_tune(1, base_lr=2e-3, freeze_epochs=1, cbs=rec)
    n = len(learn.dls.train)
    for groups, p in zip(rec.seen[n:], _positions(1, n), strict=True):
        assert groups[0][0] == pytest.approx(f_one_cycle(p, 1e-3, div=5.0, pct=0.3), rel=1e-9)


def test_lr_find_restores_state_and_suggests():
    torch.manual_seed(0)
    learn = make_learner(dls=make_dls(bs=8))
    learn.fit(1, lr=1e-3)
    params = {k: v.clone() for k, v in learn.model.state_dict().items()}
    opt_state = {k: {n: t.clone() for n, t in v.items()} for k, v in learn.opt.state.items()}
    res = learn.lr_find(num_it=30, show_plot=False)
    assert set(res._fields) == {"valley", "steep", "minimum"}
    for k, v in learn.model.state_dict().items():
        assert torch.equal(v, params[k]), k
    for p, st in learn.opt.state.items():
        assert all(torch.equal(t, opt_state[p][n]) for n, t in st.items())
    rec = learn.recorder
    n = len(rec.lrs)
    assert 6 <= n <= 30
    assert rec.lrs == pytest.approx([1e-7 * (10 / 1e-7) ** (i / 30) for i in range(n)], rel=1e-9)
    lrs = torch.tensor(rec.lrs[3:-5], dtype=torch.float64)
    losses = torch.tensor(rec.losses[3:-5], dtype=torch.float64)
    assert res.minimum == pytest.approx(float(lrs[losses.argmin()]) / 10)
    slopes = [(losses[i + 1] - losses[i]) / math.log(lrs[i + 1] / lrs[i]) for i in range(len(lrs) - 1)]
    assert res.steep == pytest.approx(float(lrs[int(np.argmin(slopes))]))


def test_suggestion_rules_on_a_known_curve():
    lrs = torch.logspace(-6, 0, 10, dtype=torch.float64)
    losses = torch.tensor([3.0, 2.9, 2.5, 2.0, 1.2, 1.0, 1.1, 3.0, 5.0, 9.0], dtype=torch.float64)
    # longest decreasing run: indices 0..5 (length 6); fastai: start = 5 - 6 = -1,
    # sections = 6 / 3 = 2 -> idx = -1 + 2 + 1 = 2
    assert valley(lrs, losses, 10)[0] == pytest.approx(float(lrs[2]))
    assert steep(lrs, losses, 10)[0] == pytest.approx(float(lrs[3]))  # 2.0 -> 1.2 is steepest
    assert minimum(lrs, losses, 10)[0] == pytest.approx(float(lrs[5]) / 10)


def test_lr_find_and_plot_loss_write_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    learn = make_learner(dls=make_dls(bs=8), path=tmp_path)
    learn.lr_find(num_it=20)
    assert (tmp_path / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    assert learn.recorder.plot_loss("loss.png", skip_start=0) == tmp_path / "loss.png"
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_without_matplotlib_plots_are_skipped_with_a_warning(tmp_path, monkeypatch):
    import builtins

    learn = make_learner(dls=make_dls(bs=8), path=tmp_path)

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.warns(UserWarning, match="matplotlib is not installed, so no plot was written"):
        suggestions = learn.lr_find(num_it=20, fname="other.png")
    assert suggestions.valley > 0 and not (tmp_path / "other.png").exists()
    with pytest.warns(UserWarning, match="Recorder.plot_loss: matplotlib is not installed"):
        assert learn.recorder.plot_loss() is None


def test_lr_find_stops_on_divergence():
    learn = make_learner(dls=make_dls(bs=8))
    learn.lr_find(start_lr=1e-2, end_lr=1e6, num_it=100, show_plot=False)
    assert len(learn.recorder.lrs) < 100
