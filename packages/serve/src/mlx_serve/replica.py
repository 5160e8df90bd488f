"""One data-parallel replica: a whole ``LLMEngine`` behind an ``AsyncEngine``, in a process of
its own, spoken to over one pipe (``mlx_serve.data_parallel`` starts it).

Messages are pickled tuples, ``send_bytes``/``recv_bytes`` with the standard pickler (a tensor
travels as its bytes, not as shared memory). The server sends
``("add", request_id, prompt, params, lora_name, priority)``, ``("abort", request_id | None)``,
``("call", call_id, function)`` (a picklable ``function(engine)``, e.g. an
``operator.methodcaller``), ``("set", name, value)`` (an ``AsyncEngine`` attribute) and
``("shutdown",)``. The replica answers ``("ready", facts)`` once its engine is built (or
``("failed", message)``), ``("accepted", request_id)`` / ``("rejected", request_id, error)``,
``("outputs", stats, [(request_id, RequestOutput | error), ...])`` as its steps produce them,
and ``("result", call_id, value, error, adapters)``.

A replica ignores SIGINT (Ctrl-C reaches the whole process group: the server aborts the
requests and stops the replicas itself) and exits when the pipe closes, so a server that dies,
however it dies, leaves no replica behind; an engine that fails makes it exit non-zero, which the
server sees as the pipe closing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import sys
import threading

logger = logging.getLogger("mlx_serve")


def send(conn, lock: threading.Lock, message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    with lock:
        conn.send_bytes(data)


def main(index: int, conn, model: str, llm_options: dict, threads: int) -> None:
    """The replica process: build the engine as ``LLM`` does, then serve the pipe until told to
    stop or until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    torch.set_num_threads(threads)
    lock = threading.Lock()
    try:
        from mlx_serve.llm import LLM

        engine = LLM(model, **llm_options).engine
    except Exception as e:  # the server shows it and stops: a replica that cannot start
        send(conn, lock, ("failed", f"{type(e).__name__}: {e}"))
        sys.exit(1)
    sys.exit(asyncio.run(_Replica(index, conn, lock, engine).serve()))


class _Outbox:
    """A request's outputs queue as the ``AsyncEngine`` sees it: what it is given goes to the
    server in the replica's next ``outputs`` message."""

    def __init__(self, replica: _Replica, request_id: str):
        self.replica, self.request_id = replica, request_id

    def put_nowait(self, item) -> None:
        self.replica.post(self.request_id, item)


class _Replica:
    def __init__(self, index: int, conn, lock: threading.Lock, engine):
        self.index, self.conn, self.lock, self.engine = index, conn, lock, engine
        self.pending: list = []
        self.flushing = False

    async def serve(self) -> int:
        from mlx_serve.async_engine import AsyncEngine

        self.loop = asyncio.get_running_loop()
        self.async_engine = AsyncEngine(self.engine)
        self.async_engine.start()
        inbox: asyncio.Queue = asyncio.Queue()
        threading.Thread(target=self._read, args=(inbox,), daemon=True,
                         name=f"mlx-replica-{self.index}-reader").start()
        engine = self.engine
        send(self.conn, self.lock, ("ready", {
            "pid": os.getpid(), "config": engine.model.config, "max_model_len": engine.max_model_len,
            "num_blocks": engine.blocks.num_blocks, "block_size": engine.blocks.block_size,
            "scheduler": engine.scheduler.config, "adapters": dict(engine.loras.adapters),
            "stats": engine.stats()}))
        watchdog = asyncio.ensure_future(self._watch())
        tasks: set[asyncio.Task] = set()
        try:
            while True:
                getter = asyncio.ensure_future(inbox.get())
                await asyncio.wait({getter, watchdog}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():  # the engine failed
                    getter.cancel()
                    self._flush()
                    return 1
                message = getter.result()
                if message is None or message[0] == "shutdown":
                    break
                kind = message[0]
                if kind == "add":
                    task = asyncio.ensure_future(self._add(*message[1:]))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    # let the add reach the engine's command queue before what follows it (an
                    # abort of the same request must not overtake it)
                    await asyncio.sleep(0)
                elif kind == "abort":
                    if message[1] is None:
                        self.async_engine.abort_all()
                    else:
                        self.async_engine.abort(message[1])
                elif kind == "call":
                    task = asyncio.ensure_future(self._call(*message[1:]))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                elif kind == "set":
                    setattr(self.async_engine, message[1], message[2])
        finally:
            watchdog.cancel()
        self.async_engine.shutdown()  # aborts what is left: its streams end with "abort"
        await asyncio.sleep(0.05)  # the engine thread's last outputs reach the outbox
        self._flush()
        return 0

    def _read(self, inbox: asyncio.Queue) -> None:
        while True:
            try:
                message = pickle.loads(self.conn.recv_bytes())
            except (EOFError, OSError):  # the server is gone: stop
                message = None
            try:
                self.loop.call_soon_threadsafe(inbox.put_nowait, message)
            except RuntimeError:  # the loop is closed
                return
            if message is None:
                return

    async def _watch(self) -> None:
        while self.async_engine.healthy:
            await asyncio.sleep(0.2)
        logger.error("data-parallel replica %d: the engine stopped", self.index)

    async def _add(self, request_id, prompt, params, lora_name, priority) -> None:
        try:
            await self.async_engine.add_request(request_id, prompt, params,
                                                _Outbox(self, request_id), lora_name, priority)
        except Exception as e:  # ValueError, EngineOverloaded, EngineDead: the server's to tell
            self._flush()  # outputs first: a rejection ends the request's stream
            send(self.conn, self.lock, ("rejected", request_id, e))
        else:
            send(self.conn, self.lock, ("accepted", request_id))

    async def _call(self, call_id, function) -> None:
        try:
            value, error = await self.async_engine.call(function), None
        except Exception as e:
            value, error = None, e
        send(self.conn, self.lock, ("result", call_id, value, error,
                                    dict(self.engine.loras.adapters)))

    def post(self, request_id: str, item) -> None:
        self.pending.append((request_id, item))
        if not self.flushing:
            self.flushing = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flushing = False
        if self.pending:
            batch, self.pending = self.pending, []
            send(self.conn, self.lock, ("outputs", self.async_engine.stats, batch))

