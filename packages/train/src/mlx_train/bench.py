"""``mlx bench learner``: the Learner's per-batch overhead against a hand-written PyTorch loop
doing the same work (same model, data order, param groups, AdamW, loss logging and a validation
pass with accuracy), as the ratio of their median epoch times.

Both sides start from the same weights and see the same batches, so they must end with the
same weights: the result reports the largest difference (0 when both really did the same work).
Runs alternate (learner, loop, loop, learner, ...) after a warm-up, so drifting machine load hits
both. The ratio is ``learner_s / hand_s`` of each side's fastest epoch (other processes only ever
add time, so the minimum is the least disturbed measurement); ``median_ratio`` is the same for
the medians.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mlx_train.data import DataLoaders
from mlx_train.learner import Learner
from mlx_train.metrics import accuracy
from mlx_train.optimizer import bias_params, norm_params


def _model(n_in: int, width: int, n_out: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, n_out))


def _data(n_batches: int, bs: int, n_in: int, n_out: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * bs + bs, n_in, generator=g)
    y = torch.randint(0, n_out, (len(x),), generator=g)
    return TensorDataset(x[:-bs], y[:-bs]), TensorDataset(x[-bs:], y[-bs:])


def _loaders(train, valid, bs: int, seed: int):
    return (DataLoader(train, batch_size=bs, shuffle=True,
                       generator=torch.Generator().manual_seed(seed)),
            DataLoader(valid, batch_size=bs))


def hand_loop(model: nn.Module, train_dl, valid_dl, lr: float) -> float:
    """One epoch the way a careful hand-written loop does it; returns the seconds it took."""
    start = time.perf_counter()
    no_decay = {id(p) for p in norm_params(model) + bias_params(model)}
    decay = [p for p in model.parameters() if id(p) not in no_decay]
    keep = [p for p in model.parameters() if id(p) in no_decay]
    opt = torch.optim.AdamW([{"params": decay}, {"params": keep, "weight_decay": 0.0}], lr=lr)
    loss_func = nn.CrossEntropyLoss()
    model.train()
    losses = []
    for xb, yb in train_dl:
        loss = loss_func(model(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    total = correct = 0.0
    with torch.no_grad():
        for xb, yb in valid_dl:
            pred = model(xb)
            total += loss_func(pred, yb).item() * len(yb)
            correct += float(accuracy(pred, yb)) * len(yb)
    return time.perf_counter() - start


def learner_epoch(model: nn.Module, train_dl, valid_dl, lr: float) -> float:
    learn = Learner(DataLoaders(train_dl, valid_dl), model, nn.CrossEntropyLoss(), lr=lr,
                    metrics=accuracy, progress=False)
    start = time.perf_counter()
    with learn.no_logging():
        learn.fit(1, lr)
    return time.perf_counter() - start


def run(quick: bool = False, n_batches: int | None = None, repeats: int | None = None,
        bs: int = 64, width: int = 256, n_in: int = 32, n_out: int = 4, lr: float = 1e-3,
        threads: int = 1, seed: int = 0) -> dict:
    """Time both sides; ``quick``: few batches and repeats (a smoke test, noisy)."""
    n_batches = n_batches or (20 if quick else 200)
    repeats = repeats or (3 if quick else 11)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        train, valid = _data(n_batches, bs, n_in, n_out, seed)
        times: dict[str, list[float]] = {"learner": [], "hand": []}
        finals = {}
        sides = {"learner": learner_epoch, "hand": hand_loop}
        for i in range(repeats + 1):  # the first round warms up and is not counted
            for name, side in (sides.items() if i % 2 == 0 else reversed(sides.items())):
                model = _model(n_in, width, n_out, seed)
                t = side(model, *_loaders(train, valid, bs, seed), lr)
                if i:
                    times[name].append(t)
                finals[name] = [p.detach().clone() for p in model.parameters()]
    finally:
        torch.set_num_threads(old_threads)
    learner_s, hand_s = min(times["learner"]), min(times["hand"])
    median_ratio = statistics.median(times["learner"]) / statistics.median(times["hand"])
    diff = max(float((a - b).abs().max()) for a, b in zip(finals["learner"], finals["hand"],
                                                          strict=True))
    return {"n_batches": n_batches, "bs": bs, "width": width, "repeats": repeats,
            "threads": threads, "learner_times_s": times["learner"], "hand_times_s": times["hand"],
            "learner_s": learner_s, "hand_s": hand_s, "ratio": learner_s / hand_s,
            "median_ratio": median_ratio,
            "overhead_per_batch_us": (learner_s - hand_s) / (n_batches + 1) * 1e6,
            "max_weight_difference": diff}


__all__ = ["hand_loop", "learner_epoch", "run"]
