"""The synchronous ``LLMEngine`` behind an asyncio front: one thread steps it, coroutines await.

Coroutines never touch the engine. They put commands (add, abort) on a thread-safe queue; the
engine thread applies them between steps, runs ``step()`` while there is work, and hands each
``RequestOutput`` to the asyncio queue of its request with ``loop.call_soon_threadsafe``. A
consumer that goes away (a client that disconnects, a cancelled task) aborts its requests, so
their KV blocks are freed at the engine's next step.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from mlx_serve.engine import EngineStats, LLMEngine
from mlx_serve.outputs import RequestOutput
from mlx_serve.sampling_params import SamplingParams

logger = logging.getLogger("mlx_serve")


class EngineOverloaded(RuntimeError):
    """The waiting queue is full: try again later."""


class EngineDead(RuntimeError):
    """The engine thread stopped (after an error, or at shutdown)."""


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    accepted: asyncio.Future
    lora_name: str | None = None
    priority: int = 0


@dataclass
class _Call:
    """Run ``function(engine)`` on the engine thread between steps (adapter loading)."""
    function: object
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future


class AsyncEngine:
    """``LLMEngine`` driven from a background thread.

    ``max_waiting_seqs``: adding a request while this many sequences already wait raises
    ``EngineOverloaded`` (the server answers 503); ``None`` never refuses.
    ``on_step(engine, outputs)`` runs in the engine thread after every step (metrics).
    """

    def __init__(self, engine: LLMEngine, *, max_waiting_seqs: int | None = None,
                 on_step=None):
        self.engine = engine
        self.max_waiting_seqs = max_waiting_seqs
        self.on_step = on_step
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Add] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.error: BaseException | None = None
        self.stats: EngineStats = engine.stats()
        self._generated = collections.deque(maxlen=64)  # (time, generation tokens so far)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="mlx-serve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what is left, stop the thread and wait for it, then close the engine (its
        tensor-parallel workers stop; nothing to do for a one-process engine): the server's
        shutdown must stop them before ``mlx serve`` ends by the signal it caught, which skips
        exit handlers."""
        if self._thread is None:
            return
        self._stopping.set()
        self._commands.put(None)  # wake the thread if it is waiting for work
        self._thread.join(timeout)
        self._thread = None
        self.engine.close()

    @property
    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    # -- the coroutine side ---------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                          outputs: asyncio.Queue, lora_name: str | None = None,
                          priority: int = 0) -> None:
        """Queue a request; its ``RequestOutput``s will arrive on ``outputs``. Raises the
        engine's ``ValueError`` for a prompt it refuses, and ``EngineOverloaded``."""
        if not self.healthy:
            raise EngineDead("the engine is not running")
        loop = asyncio.get_running_loop()
        command = _Add(request_id, prompt, params, loop, outputs, loop.create_future(), lora_name,
                       priority)
        self._commands.put(command)
        await self._settled(command.accepted)

    async def call(self, function):
        """``function(engine)`` run on the engine thread between steps; its result, or its
        exception raised here."""
        if not self.healthy:
            raise EngineDead("the engine is not running")
        loop = asyncio.get_running_loop()
        command = _Call(function, loop, loop.create_future())
        self._commands.put(command)
        return await self._settled(command.done)

    async def call_one(self, function):
        """``call`` where one engine will do (embeddings): here there is one; a
        ``DataParallelEngine`` picks a replica."""
        return await self.call(function)

    async def _settled(self, future: asyncio.Future):
        while not future.done():  # unless the engine thread died before reading the command
            await asyncio.wait({future}, timeout=1.0)
            if not future.done() and not self.healthy:
                raise EngineDead("the engine is not running")
        return future.result()

    def abort(self, request_id: str) -> None:
        """Stop a request (thread-safe; unknown and finished ids are ignored)."""
        self._commands.put(("abort", request_id))

    def abort_all(self) -> None:
        """Stop every request (thread-safe): their streams end with finish reason "abort"."""
        self._commands.put(("abort", None))

    async def generate(self, requests: list[tuple[str, str | list[int]]],
                       params: SamplingParams, lora_name: str | None = None, priority: int = 0,
                       ) -> AsyncIterator[RequestOutput]:
        """Run ``(request_id, prompt)`` pairs together; yield their outputs as they come, each
        request's last one finished. Requests not finished when the caller stops iterating (or
        is cancelled) are aborted. Validation errors are raised before the first output."""
        outputs: asyncio.Queue = asyncio.Queue()
        unfinished: set[str] = set()
        try:
            for request_id, prompt in requests:
                unfinished.add(request_id)  # before the await: a cancelled add is aborted too
                await self.add_request(request_id, prompt, params, outputs, lora_name, priority)
            while unfinished:
                out = await outputs.get()
                if isinstance(out, BaseException):
                    raise out
                if out.finished:
                    unfinished.discard(out.request_id)
                yield out
        finally:
            for request_id in unfinished:
                self.abort(request_id)

    # -- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                busy = self.engine.has_unfinished_requests() or bool(self.engine.requests)
                self._apply_commands(block=not busy)
                if self._stopping.is_set():
                    break
                if not busy:  # a step checks its workers itself; idle, a dead one is seen here
                    self.engine.check_workers()
                if self.engine.has_unfinished_requests() or self.engine.requests:
                    outputs = self.engine.step()
                    self._publish(outputs)
        except BaseException as e:  # a broken engine must not hang its clients
            logger.exception("the engine thread failed; the server can no longer generate")
            self.error = e
            self._fail_all(EngineDead(f"the engine failed: {type(e).__name__}"))
            return
        self._abort_all()

    def _apply_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(command, _Add):
                self._add(command)
            elif isinstance(command, _Call):
                self._call(command)
            elif isinstance(command, tuple):
                for request_id in ([command[1]] if command[1] is not None
                                   else list(self.engine.requests)):
                    self.engine.abort_request(request_id)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _add(self, command: _Add) -> None:
        def answer(error: BaseException | None):
            def settle():
                if command.accepted.done():
                    return
                if error is None:
                    command.accepted.set_result(None)
                else:
                    command.accepted.set_exception(error)
            _call_soon(command.loop, settle)

        waiting = len(self.engine.scheduler.waiting)
        if self.max_waiting_seqs is not None and waiting + command.params.n > self.max_waiting_seqs:
            return answer(EngineOverloaded(f"{waiting} sequences are already waiting"))
        try:
            self.engine.add_request(command.prompt, command.params, request_id=command.request_id,
                                    lora_name=command.lora_name, priority=command.priority)
        except ValueError as e:
            return answer(e)
        self._streams[command.request_id] = command
        answer(None)

    def _call(self, command: _Call) -> None:
        try:
            result, error = command.function(self.engine), None
        except Exception as e:  # handed to the caller, who decides what the client sees
            result, error = None, e

        def settle():
            if command.done.done():
                return
            if error is None:
                command.done.set_result(result)
            else:
                command.done.set_exception(error)
        _call_soon(command.loop, settle)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        # stats first: a client that got its last output sees metrics that include it
        self.stats = self.engine.stats()
        self._generated.append((time.monotonic(), self.stats.generation_tokens))
        if self.on_step is not None:
            self.on_step(self, outputs)
        for out in outputs:
            command = (self._streams.pop(out.request_id, None) if out.finished
                       else self._streams.get(out.request_id))
            if command is not None:
                _call_soon(command.loop, command.outputs.put_nowait, out)

    def generation_throughput(self, window: float = 10.0) -> float:
        """Generated tokens per second over about the last ``window`` seconds."""
        return tokens_per_second(self._generated, window)

    def per_replica(self) -> list[tuple[EngineStats, float]]:
        """``(stats, generated tokens/s)`` per engine: this one (a ``DataParallelEngine`` has
        one per replica)."""
        return [(self.stats, self.generation_throughput())]

    def _abort_all(self) -> None:
        """At shutdown: abort every request and report them finished, leaving no blocks held."""
        for request_id in list(self.engine.requests):
            self.engine.abort_request(request_id)
        if self.engine.requests:
            self._publish(self.engine.step())
        self._fail_all(EngineDead("the server is shutting down"))

    def _fail_all(self, error: BaseException) -> None:
        for command in self._streams.values():
            _call_soon(command.loop, command.outputs.put_nowait, error)
        self._streams.clear()
        while True:  # requests queued but never applied
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            future = command.accepted if isinstance(command, _Add) else \
                command.done if isinstance(command, _Call) else None
            if future is not None:
                _call_soon(command.loop, lambda f=future: f.done() or f.set_exception(error))


def tokens_per_second(samples, window: float = 10.0) -> float:
    """Tokens per second over about the last ``window`` seconds, from ``(time.monotonic(),
    generated tokens so far)`` samples."""
    now = time.monotonic()
    recent = [(t, n) for t, n in list(samples) if now - t <= window]
    if len(recent) < 2 or recent[-1][0] == recent[0][0]:
        return 0.0
    return (recent[-1][1] - recent[0][1]) / (now - recent[0][0])


def _call_soon(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # that loop is closed: nobody is listening any more
        pass
