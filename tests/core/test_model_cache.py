"""The model cache under concurrent use: processes (DDP ranks, replicas, test workers) that pull
or convert the same model at once fetch it once, and none reads a half-made entry."""

import threading
import time

import torch

from mlx_core import save_model, sources
from mlx_core.models.loading import build_model
from mlx_core.paths import cache_lock
from mlx_core.presets import get_preset


def test_concurrent_pulls_fetch_and_convert_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_HOME", str(tmp_path / "home"))
    torch.manual_seed(0)
    origin = save_model(build_model(get_preset("tiny-llama")), tmp_path / "origin")
    fetches = []

    def slow_fetch(workdir):
        fetches.append(workdir)
        time.sleep(0.5)  # long enough for the other puller to reach the lock
        return origin

    source = sources.ModelSource(name="slow-model", preset="tiny-llama", origin="test",
                                 fetch=slow_fetch)
    sources.registry.model_sources.register("slow-model", source)
    results, errors = [], []

    def puller():
        try:
            results.append(sources.pull("slow-model"))
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)

    # flock locks belong to an open file, so two threads contend as two processes would
    threads = [threading.Thread(target=puller) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        sources.registry.model_sources._items.pop("slow-model")
    assert not errors, errors
    assert len(fetches) == 1, "the second puller must wait and find the entry made"
    assert results == [source.cache_dir, source.cache_dir]
    assert (source.cache_dir / "config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "home" / "models").iterdir()) == ["slow-model"]


def test_cache_lock_serialises_holders_of_one_entry_only(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_HOME", str(tmp_path))
    events, a_holds, c_held = [], threading.Event(), threading.Event()

    def holder(name, target, entered, wait_for=None):
        with cache_lock(tmp_path / target):
            events.append(f"{name} in")
            if entered is not None:
                entered.set()
            if wait_for is not None:  # times out (and fails below) if the other one is blocked
                wait_for.wait(timeout=30)
            events.append(f"{name} out")

    # a holds "entry" until c has held "other-entry", and b asks for "entry" while a holds it
    first = threading.Thread(target=holder, args=("a", "entry", a_holds, c_held))
    first.start()
    assert a_holds.wait(timeout=30)
    second = threading.Thread(target=holder, args=("b", "entry", None))
    other = threading.Thread(target=holder, args=("c", "other-entry", c_held))
    second.start()
    other.start()
    for t in (first, other, second):
        t.join(timeout=60)
    assert c_held.is_set() and events.index("c in") < events.index("a out")
    assert events.index("a out") < events.index("b in")
