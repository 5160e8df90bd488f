"""Data-parallel serving: N whole engines (replicas), each with its own KV cache in a process of
its own (``mlx_serve.replica``, started with "spawn"), behind one server.

``DataParallelEngine`` is what ``build_app`` serves in place of an ``AsyncEngine``, with the same
face: ``add_request``/``generate`` (streams of ``RequestOutput``), ``abort``, ``abort_all``,
``call`` (on every replica: LoRA loading), ``call_one`` (on one: embeddings), ``stats`` (summed)
and ``per_replica()``, ``healthy``, ``generation_throughput``, ``start``, ``shutdown``. What the
server's handler reads of an engine (tokenizer, model config, ``max_model_len``, the cache's
shape, the scheduling policy, the adapters loaded) lives in this process, in ``engine``.

Each request goes where ``PrefixAwareRouter`` says. A replica that dies makes ``healthy``
false at once: its requests end with ``EngineDead``, new ones are refused (the server answers
503), and ``run_server`` stops the server, which exits non-zero.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import pickle
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, fields
from types import SimpleNamespace

from mlx_serve.async_engine import AsyncEngine, EngineDead, _call_soon, tokens_per_second
from mlx_serve.engine import EngineStats
from mlx_serve.sampling_params import SamplingParams

logger = logging.getLogger("mlx_serve")


class PrefixAwareRouter:
    """Picks a replica for each request: the one that already caches the longest block-aligned
    prefix of its prompt, else the one with the most free KV blocks.

    The router does not ask the replicas what they cache (a round trip per request, on the
    critical path); it remembers, per replica, the chained hashes of the full prompt blocks it
    sent there (as ``BlockManager`` hashes them: previous block's hash, the block's token ids,
    the adapter), in an LRU bounded by that replica's number of blocks, which is as much as it
    can cache; vLLM's and SGLang's prefix-aware routers keep the same approximate view (SGLang:
    a radix tree per worker, pruned by size). A prefix the replica has since evicted costs a
    recomputation there, never a wrong answer.

    Free blocks are each replica's last reported count less the blocks of the requests sent to
    it that it has not reported yet (so a burst of requests spreads out before any report).
    The prefix preference gives way to balance, as SGLang's ``balance_abs_threshold``: a
    replica with ``balance_threshold`` more sequences (running, waiting, and sent) than the
    least loaded one, or without room for the request's uncached blocks, is chosen for its
    free blocks only. Ties go to the lower index.
    """

    def __init__(self, num_blocks: list[int], block_size: int, balance_threshold: int = 8):
        self.block_size = block_size
        self.num_blocks = list(num_blocks)
        self.balance_threshold = balance_threshold
        n = len(num_blocks)
        self.free = list(num_blocks)  # as last reported
        self.load = [0] * n  # running + waiting sequences, as last reported
        self.sent: list[dict[str, tuple[int, int]]] = [{} for _ in range(n)]  # id -> (blocks, seqs)
        self.prefixes: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(n)]

    def report(self, replica: int, stats: EngineStats) -> None:
        self.free[replica] = stats.num_free_blocks
        self.load[replica] = stats.num_running + stats.num_waiting

    def _hashes(self, token_ids: list[int], lora_name: str | None) -> list[int]:
        hashes, previous, size = [], None, self.block_size
        for start in range(0, len(token_ids) - size + 1, size):
            previous = hash((previous, tuple(token_ids[start:start + size]), lora_name))
            hashes.append(previous)
        return hashes

    def free_estimate(self, replica: int) -> int:
        return self.free[replica] - sum(b for b, _ in self.sent[replica].values())

    def load_estimate(self, replica: int) -> int:
        return self.load[replica] + sum(s for _, s in self.sent[replica].values())

    def route(self, request_id: str, token_ids: list[int], lora_name: str | None = None,
              n: int = 1) -> int:
        """The replica for this request, which counts as sent there until ``admitted``."""
        hashes = self._hashes(token_ids, lora_name)
        replicas = range(len(self.num_blocks))
        matched = []
        for r in replicas:
            count = 0
            for h in hashes:
                if h not in self.prefixes[r]:
                    break
                count += 1
            matched.append(count)
        need = n * -(-(len(token_ids) + 1) // self.block_size)
        free = [self.free_estimate(r) for r in replicas]
        load = [self.load_estimate(r) for r in replicas]
        eligible = [r for r in replicas if matched[r] > 0 and free[r] >= need - matched[r]
                    and load[r] - min(load) <= self.balance_threshold]
        if eligible:
            chosen = max(eligible, key=lambda r: (matched[r], free[r], -r))
        else:
            chosen = max(replicas, key=lambda r: (free[r], -load[r], -r))
        self.sent[chosen][request_id] = (need - matched[chosen], n)
        cache = self.prefixes[chosen]
        for h in hashes:
            cache[h] = None
            cache.move_to_end(h)
        while len(cache) > self.num_blocks[chosen]:
            cache.popitem(last=False)
        return chosen

    def admitted(self, replica: int, request_id: str) -> None:
        """The replica reported on the request (its blocks are in its stats now), or refused it."""
        self.sent[replica].pop(request_id, None)


@dataclass
class _Stream:
    replica: int
    outputs: asyncio.Queue
    accepted: asyncio.Future
    reported: bool = False


class _Facts:
    """What the server reads of an engine, in the server's process: the tokenizer, the model's
    config, ``max_model_len``, the cache's shape (the smallest replica's), the scheduler's config
    and the LoRA adapters loaded (every replica holds the same ones)."""

    def __init__(self, tokenizer, ready: list[dict]):
        first = ready[0]
        self.tokenizer = tokenizer
        self.model = SimpleNamespace(config=first["config"])
        self.max_model_len = first["max_model_len"]
        self.blocks = SimpleNamespace(num_blocks=min(r["num_blocks"] for r in ready),
                                      block_size=first["block_size"])
        self.scheduler = SimpleNamespace(config=first["scheduler"])
        self.loras = SimpleNamespace(adapters=dict(first["adapters"]))

    def list_loras(self) -> list[str]:
        return list(self.loras.adapters)


class DataParallelEngine:
    """``data_parallel_size`` replicas of ``model`` (a registered name, an HF directory or a
    ``.gguf`` file), each built as ``LLM(model, dtype=, device=, loras=, **engine_options)``
    builds its engine, with ``torch.get_num_threads() // data_parallel_size`` threads each; on
    the CPU each replica's KV cache gets its share of the budget (``kv_cache_fraction`` / N when
    neither ``num_blocks`` nor ``kv_cache_memory`` is given); ``device="cuda"`` puts replica i on
    GPU i. ``max_waiting_seqs`` is each replica's. Blocks until every replica is ready."""

    def __init__(self, model: str | os.PathLike, data_parallel_size: int, *,
                 dtype: str = "float32", device: str = "cpu", loras: dict[str, str] | None = None,
                 max_waiting_seqs: int | None = None, start_timeout: float = 900.0,
                 balance_threshold: int = 8, **engine_options):
        import torch

        from mlx_core import load_tokenizer
        from mlx_serve import replica
        from mlx_serve.config import EngineConfig

        if data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1 (got {data_parallel_size})")
        if isinstance(model, os.PathLike):
            model = os.fspath(model)
        if not isinstance(model, str):
            raise ValueError("data-parallel replicas load the model themselves: give its name, "
                             "HF directory or .gguf file, not a built model")
        EngineConfig(**engine_options)  # bad options fail before any process starts
        self.size = data_parallel_size
        tokenizer = load_tokenizer(model)  # also fetches / converts the model once, for all
        threads = max(1, torch.get_num_threads() // data_parallel_size)
        context = torch.multiprocessing.get_context("spawn")
        self._processes, self._conns = [], []
        self._finalizer = weakref.finalize(self, _stop, self._processes, self._conns, 10.0)
        for index in range(data_parallel_size):
            options = dict(engine_options, **_share(engine_options, data_parallel_size, device))
            llm_options = dict(options, dtype=dtype, device=_device(device, index),
                               loras=dict(loras or {}))
            parent, child = context.Pipe()
            process = context.Process(target=replica.main, name=f"mlx-serve-replica-{index}",
                                      args=(index, child, model, llm_options, threads))
            process.start()
            child.close()
            self._processes.append(process)
            self._conns.append(parent)
        try:
            ready = [self._wait_ready(i, start_timeout) for i in range(data_parallel_size)]
        except BaseException:
            self._finalizer()
            raise
        self.pids = [r["pid"] for r in ready]
        self.engine = _Facts(tokenizer, ready)
        self.router = PrefixAwareRouter([r["num_blocks"] for r in ready],
                                        ready[0]["block_size"], balance_threshold)
        self.replica_stats: list[EngineStats] = [r["stats"] for r in ready]
        self._adapters = [r["adapters"] for r in ready]
        self._generated = [collections.deque(maxlen=64) for _ in ready]
        self._send_locks = [threading.Lock() for _ in ready]
        self._streams: dict[str, _Stream] = {}
        self._calls: dict[int, tuple[int, asyncio.Future]] = {}
        self._call_ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readers: list[threading.Thread] = []
        self._stopping = False
        self.error: BaseException | None = None
        self.on_step = None  # on_step(self, outputs), as AsyncEngine's (metrics)
        self._max_waiting_seqs = None
        self.max_waiting_seqs = max_waiting_seqs

    def _wait_ready(self, index: int, timeout: float) -> dict:
        conn, process = self._conns[index], self._processes[index]
        deadline = time.monotonic() + timeout
        while not conn.poll(0.2):
            if not process.is_alive():
                raise RuntimeError(f"data-parallel replica {index} exited while starting (exit "
                                   f"code {process.exitcode}); the log above has the reason")
            if time.monotonic() > deadline:
                raise RuntimeError(f"data-parallel replica {index} did not start in {timeout} s")
        kind, payload = pickle.loads(conn.recv_bytes())
        if kind == "failed":
            raise RuntimeError(f"data-parallel replica {index} could not start: {payload}")
        return payload

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start listening to the replicas (on the running event loop)."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        for index in range(self.size):
            thread = threading.Thread(target=self._read, args=(index,), daemon=True,
                                      name=f"mlx-serve-replica-{index}-reader")
            thread.start()
            self._readers.append(thread)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every replica (what they still run is aborted) and wait for them; a replica that
        does not stop in ``timeout`` s is killed."""
        self._stopping = True
        self._finalizer.detach()
        _stop(self._processes, self._conns, timeout)
        self._fail(EngineDead("the server is shutting down"))
        for thread in self._readers:
            thread.join(2.0)

    @property
    def healthy(self) -> bool:
        return self._loop is not None and self.error is None and not self._stopping

    @property
    def max_waiting_seqs(self) -> int | None:
        return self._max_waiting_seqs

    @max_waiting_seqs.setter
    def max_waiting_seqs(self, value: int | None) -> None:
        """Each replica's: beyond it, its new requests are refused (``EngineOverloaded``)."""
        if value != self._max_waiting_seqs:
            for index in range(self.size):
                self._send(index, ("set", "max_waiting_seqs", value))
        self._max_waiting_seqs = value

    # -- the coroutine side ---------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                          outputs: asyncio.Queue, lora_name: str | None = None,
                          priority: int = 0) -> None:
        """Route and queue a request; as ``AsyncEngine.add_request``."""
        if not self.healthy:
            raise EngineDead(self._dead_reason())
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self.engine.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        index = self.router.route(request_id, ids, lora_name, params.n)
        stream = _Stream(index, outputs, asyncio.get_running_loop().create_future())
        self._streams[request_id] = stream
        self._send(index, ("add", request_id, prompt, params, lora_name, priority))
        await stream.accepted

    # the same generator as AsyncEngine's: it needs only add_request and abort
    generate = AsyncEngine.generate

    def abort(self, request_id: str) -> None:
        """Stop a request (unknown and finished ids are ignored)."""
        stream = self._streams.get(request_id)
        if stream is not None:
            self._send(stream.replica, ("abort", request_id), quiet=True)

    def abort_all(self) -> None:
        """Stop every request on every replica: their streams end with finish reason "abort"."""
        for index in range(self.size):
            self._send(index, ("abort", None), quiet=True)

    async def call(self, function):
        """``function(engine)`` (picklable: e.g. ``operator.methodcaller``) on every replica,
        between their steps; the first replica's result, or the first error raised. For what
        must hold on all of them, such as loading a LoRA adapter."""
        results = await asyncio.gather(*(self._call(i, function) for i in range(self.size)),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results[0]

    async def call_one(self, function):
        """``function(engine)`` on the least loaded replica (embeddings)."""
        return await self._call(min(range(self.size), key=self.router.load_estimate), function)

    async def _call(self, index: int, function):
        if not self.healthy:
            raise EngineDead(self._dead_reason())
        call_id = next(self._call_ids)
        future = asyncio.get_running_loop().create_future()
        self._calls[call_id] = (index, future)
        self._send(index, ("call", call_id, function))
        return await future

    # -- statistics -----------------------------------------------------------------------------
    @property
    def stats(self) -> EngineStats:
        """The replicas' stats summed (the prefix cache hit rate weighted by prompt tokens)."""
        per = self.replica_stats
        total = EngineStats(**{f.name: sum(getattr(s, f.name) for s in per)
                               for f in fields(EngineStats)})
        prompts = sum(s.prompt_tokens for s in per)
        total.prefix_cache_hit_rate = (sum(s.prefix_cache_hit_rate * s.prompt_tokens for s in per)
                                       / prompts if prompts else 0.0)
        return total

    def per_replica(self) -> list[tuple[EngineStats, float]]:
        """``(stats, generated tokens/s over ~10 s)`` of each replica."""
        return [(s, tokens_per_second(g)) for s, g in zip(self.replica_stats, self._generated,
                                                          strict=True)]

    def generation_throughput(self, window: float = 10.0) -> float:
        return sum(tokens_per_second(g, window) for g in self._generated)

    # -- messages from the replicas -------------------------------------------------------------
    def _send(self, index: int, message, quiet: bool = False) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            with self._send_locks[index]:
                self._conns[index].send_bytes(data)
        except (OSError, ValueError):  # the replica is gone (or its pipe closed at shutdown)
            if not quiet:
                raise EngineDead(self._dead_reason()) from None

    def _read(self, index: int) -> None:
        conn = self._conns[index]
        while True:
            try:
                message = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                break
            _call_soon(self._loop, self._on_message, index, message)
        process = self._processes[index]
        process.join(1.0)
        _call_soon(self._loop, self._on_exit, index, process.exitcode)

    def _on_message(self, index: int, message) -> None:
        kind = message[0]
        if kind == "outputs":
            _, stats, batch = message
            self.replica_stats[index] = stats
            self.router.report(index, stats)
            self._generated[index].append((time.monotonic(), stats.generation_tokens))
            published = []
            for request_id, item in batch:
                stream = self._streams.get(request_id)
                if stream is None:
                    continue
                self._accepted(request_id, stream)
                stream.outputs.put_nowait(item)
                if isinstance(item, BaseException) or item.finished:
                    del self._streams[request_id]
                if not isinstance(item, BaseException):
                    published.append(item)
            if self.on_step is not None and published:
                self.on_step(self, published)
        elif kind == "accepted":
            stream = self._streams.get(message[1])
            if stream is not None and not stream.accepted.done():
                stream.accepted.set_result(None)
        elif kind == "rejected":
            _, request_id, error = message
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                self.router.admitted(index, request_id)
                if stream.accepted.done():
                    stream.outputs.put_nowait(error)
                else:
                    stream.accepted.set_exception(error)
        elif kind == "result":
            _, call_id, value, error, adapters = message
            self._adapters[index] = adapters  # served: the adapters every replica holds
            self.engine.loras.adapters = {name: a for name, a in adapters.items()
                                          if all(name in held for held in self._adapters)}
            _, future = self._calls.pop(call_id, (None, None))
            if future is not None and not future.done():
                if error is None:
                    future.set_result(value)
                else:
                    future.set_exception(error)

    def _accepted(self, request_id: str, stream: _Stream) -> None:
        if not stream.reported:  # its blocks are in the replica's stats from now on
            stream.reported = True
            self.router.admitted(stream.replica, request_id)
        if not stream.accepted.done():
            stream.accepted.set_result(None)

    def _on_exit(self, index: int, exitcode: int | None) -> None:
        if self._stopping:
            return
        if self.error is None:
            self.error = EngineDead(f"data-parallel replica {index} (pid {self.pids[index]}) "
                                    f"exited (exit code {exitcode}); the server is stopping")
            logger.error("%s", self.error)
        self._fail(self.error, index)

    def _fail(self, error: BaseException, index: int | None = None) -> None:
        """End the streams and calls on replica ``index`` (None: on every replica) with
        ``error``."""
        for request_id, stream in list(self._streams.items()):
            if index is None or stream.replica == index:
                del self._streams[request_id]
                if stream.accepted.done():
                    _call_soon(self._loop, stream.outputs.put_nowait, error)
                else:
                    _settle(stream.accepted, error)
        for call_id, (replica, future) in list(self._calls.items()):
            if index is None or replica == index:
                del self._calls[call_id]
                _settle(future, error)

    def _dead_reason(self) -> str:
        if self.error is not None:
            return str(self.error)
        return "the server is shutting down" if self._stopping else "the engine is not running"


def _settle(future: asyncio.Future, error: BaseException) -> None:
    loop = future.get_loop()
    _call_soon(loop, lambda: future.done() or future.set_exception(error))


def _share(engine_options: dict, size: int, device: str) -> dict:
    """A replica's share of a KV-cache budget given as a fraction of the free memory: on the
    CPU the replicas share one memory, on GPUs each has its own."""
    if size == 1 or device.startswith("cuda") or engine_options.get("num_blocks") is not None \
            or engine_options.get("kv_cache_memory") is not None:
        return {}
    return {"kv_cache_fraction": engine_options.get("kv_cache_fraction", 0.25) / size}


def _device(device: str, index: int) -> str:
    if device == "cuda":
        import torch

        return f"cuda:{index % max(1, torch.cuda.device_count())}"
    return device


def _stop(processes: list, conns: list, timeout: float) -> None:
    """Ask every replica to stop, wait ``timeout`` s, then terminate and kill what is left."""
    for conn in conns:
        try:
            conn.send_bytes(pickle.dumps(("shutdown",)))
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join(2.0)
        if process.is_alive():
            process.kill()
            process.join(2.0)
    for conn in conns:
        conn.close()
