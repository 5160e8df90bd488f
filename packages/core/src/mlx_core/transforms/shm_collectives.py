"""All-reduce and all-gather through shared memory, for tensor-parallel ranks that are processes
of one machine computing on its CPU (what vLLM's CPU backend does in C++).

gloo's collectives go through loopback TCP: on a small CPU box, about a millisecond per
all-reduce of one token's hidden state, and a decode step makes two per layer. Here each rank
copies its tensor into its row of a shared buffer, publishes a step counter, waits (spinning)
until every rank has published the same step, and reads all rows: a sum in rank order, the
same on every rank, or the rows side by side. Buffers alternate between two halves, so a rank
may start the next exchange while the others still read this one (none can start a third: it
waits for them to publish the next). x86 keeps stores in order, so a counter seen means its
rows are written.

``ShmExchange`` is made once (by the process that starts the ranks) and handed to each rank,
which binds it with its rank (``bind``). A rank that stops answering is noticed: ``alive`` (a
callable each rank may set) is asked every 0.1 s of waiting, and ``timeout_s`` bounds a wait.
Tensors larger than the buffer go through ``fallback`` (torch.distributed).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch


class ShmExchange:
    def __init__(self, world_size: int, capacity: int, timeout_s: float = 300.0):
        """``capacity``: float32 numbers per rank per exchange (larger tensors fall back)."""
        self.world_size, self.capacity, self.timeout_s = world_size, capacity, timeout_s
        self.rows = torch.zeros(2, world_size, capacity, dtype=torch.float32).share_memory_()
        self.published = torch.zeros(world_size, dtype=torch.int64).share_memory_()
        self.rank: int | None = None
        self.step = 0
        self.alive: Callable[[], None] | None = None  # raises if a peer is gone

    def bind(self, rank: int) -> ShmExchange:
        self.rank = rank
        return self

    def fits(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.numel() <= self.capacity

    def exchange(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` (same shape on all), ``[world_size, *x.shape]`` in rank order, as
        float32 (a view into the shared buffer, valid until this rank's next exchange but one)."""
        self.step += 1
        half = self.rows[self.step % 2]
        n = x.numel()
        half[self.rank, :n].copy_(x.reshape(-1))
        self.published[self.rank] = self.step
        self._wait_for(self.step)
        return half[:, :n].view(self.world_size, *x.shape)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.exchange(x).sum(dim=0).to(x.dtype)

    def _wait_for(self, step: int) -> None:
        started = time.monotonic()
        checked = started
        spins = 0
        while int(self.published.min()) < step:
            spins += 1
            if spins < 2000:
                continue
            os.sched_yield()  # a long wait: let the others run on a busy machine
            now = time.monotonic()
            if now - checked > 0.1:
                checked = now
                if self.alive is not None:
                    self.alive()
                if now - started > self.timeout_s:
                    raise RuntimeError(
                        f"tensor-parallel rank {self.rank}: another rank did not reach "
                        f"collective {step} within {self.timeout_s:.0f} s")


def parent_alive(parent_pid: int) -> Callable[[], None]:
    """For a worker: raise once the process that started it is gone."""
    def check() -> None:
        if os.getppid() != parent_pid:
            raise RuntimeError("tensor-parallel rank 0 (the engine's process) is gone")
    return check


__all__ = ["ShmExchange", "parent_alive"]
