"""Tensor-parallel serving: one engine's model split over ``tensor_parallel_size`` processes.

Rank 0 is the engine's own process: it runs the scheduler, the block manager, the sampler and
its share of the model. The other ranks are workers that only run the model: at each step rank
0 broadcasts the step's packed inputs (``StepInputs``: token ids, positions, slots, block
tables) and its cache copies; every rank runs the same forward on its shares
(``mlx_core.transforms.tensor_parallel``), the all-reduces inside it keep them in step, and rank
0 samples from the gathered logits. Block ids are rank 0's: a worker's paged cache holds its KV
heads of the same blocks, so freeing a sequence's blocks (finish, abort, preemption) frees them
on every rank at once.

Transport is ``torch.distributed`` (gloo on CPU, NCCL on GPU), joined as torchrun joins: a TCP
rendezvous at ``master_addr:master_port``. On one node the engine spawns its workers itself; on
several, every other node runs ``mlx serve --nnodes N --node-rank K --master-addr ...``, which
starts that node's ranks (``run_node``) and no server. Each rank on a node gets an equal share
of the threads of the process that starts them (the machine's, or a data-parallel replica's).

Faults: before each broadcast rank 0 checks that its workers live (one that died raises
``WorkerDied``, and the engine stops); a worker whose rank 0 went away fails its next
collective and exits. Workers ignore SIGINT (a Ctrl-C reaches the whole process group): rank 0
stops them, or its exit does.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from mlx_core.transforms.shm_collectives import ShmExchange, parent_alive
from mlx_core.transforms.tensor_parallel import shard_model

logger = logging.getLogger("mlx_serve")

# a collective that waits longer than this fails (a rank that hangs, not one that died: a dead
# peer's closed connection fails it at once)
COLLECTIVE_TIMEOUT = timedelta(seconds=300)


class WorkerDied(RuntimeError):
    """A tensor-parallel worker process exited: the engine cannot run the model any more."""


def check_parallel_options(world_size: int, nnodes: int, node_rank: int) -> None:
    if world_size < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1 (got {world_size})")
    if nnodes < 1 or world_size % nnodes:
        raise ValueError(f"tensor_parallel_size={world_size} must be a multiple of nnodes={nnodes} "
                         "(each node runs the same number of ranks)")
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"node_rank={node_rank} must be in [0, nnodes={nnodes})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _threads_per_rank(ranks_on_node: int) -> int:
    """This process's thread budget shared by the ranks it starts (a data-parallel replica's
    share of the machine, or the whole machine)."""
    return max(1, torch.get_num_threads() // ranks_on_node)


class TensorParallelGroup:
    """Rank 0's side: starts this node's workers, joins the group, shards the engine's model,
    and sends the workers what to run (``send``)."""

    def __init__(self, model: nn.Module, config):
        world, nnodes = config.tensor_parallel_size, config.nnodes
        check_parallel_options(world, nnodes, 0)
        if dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is initialised in this process already (another "
                "tensor-parallel engine, or a training job): close that engine first "
                "(LLM.close()), or serve from a process of its own")
        self.world_size, self.device = world, model.device
        port = config.master_port or (_free_port() if nnodes == 1 else None)
        if port is None:
            raise ValueError("serving over several nodes needs master_port (--master-port), the "
                             "port the other nodes join at")
        self.init_method = f"tcp://{config.master_addr}:{port}"
        ranks_on_node = world // nnodes
        self._threads = torch.get_num_threads()  # this process's, given back at close
        self._threads_each = _threads_per_rank(ranks_on_node)
        if self.device.type == "cpu":
            torch.set_num_threads(self._threads_each)
        # one machine, CPU: collectives through shared memory (gloo's loopback TCP costs about
        # a millisecond per all-reduce on a small box); several machines, or GPUs: gloo / NCCL
        self.shm = (_shm_exchange(model.config, config) if nnodes == 1
                    and self.device.type == "cpu" and config.shm_collectives else None)
        self.processes = _start_ranks(model, config, self.init_method, range(1, ranks_on_node),
                                      ranks_on_node, self._threads_each, self.shm)
        if self.shm is not None:
            self.shm.alive = self.check_alive
        self._closed = False
        atexit.register(self.close)
        try:
            dist.init_process_group(_backend(self.device), init_method=self.init_method, rank=0,
                                    world_size=world, timeout=COLLECTIVE_TIMEOUT)
        except BaseException:
            self.close()
            raise
        self.time = shard_model(model, 0, world, shm=self.shm).tensor_parallel.time  # rank 0's
        logger.info("tensor parallelism: %d ranks (%d nodes), rendezvous at %s", world, nnodes,
                    self.init_method)

    def start(self, num_blocks: int) -> None:
        """Tell the workers the cache size rank 0 chose (they then build their runners)."""
        self.send(num_blocks)

    def send(self, message) -> None:
        """Broadcast ``message`` to every rank (``("step", copies, inputs)``, ``("embed",
        token_lists, pooling)``, ``("lora_load", name, path)``, ``("lora_unload", name)``, or
        None: stop)."""
        self.check_alive()
        dist.broadcast_object_list([message], src=0)

    def explained(self, error: BaseException, wait_s: float = 2.0) -> BaseException:
        """``error`` raised by a collective, as ``WorkerDied`` when a worker exited (a peer that
        died resets its connections before its exit is seen: wait for that a moment)."""
        deadline = time.monotonic() + wait_s
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        try:
            self.check_alive()
        except WorkerDied as died:
            return died
        return error

    def check_alive(self) -> None:
        for rank, process in enumerate(self.processes, start=1):
            if process.exitcode is not None:
                raise WorkerDied(f"tensor-parallel worker rank {rank} (pid {process.pid}) exited "
                                 f"with code {process.exitcode}; the engine cannot run its model")

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers (they finish their step and exit), then leave the group."""
        if self._closed:
            return
        self._closed = True
        if dist.is_initialized():
            try:
                if all(p.exitcode is None for p in self.processes):
                    dist.broadcast_object_list([None], src=0)
            except Exception:  # a worker gone: the others exit as their collective fails
                pass
        for process in self.processes:
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join(timeout)
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(self._threads)
        atexit.unregister(self.close)


def _shm_exchange(model_config, config) -> ShmExchange:
    """Room for the widest collective a step makes: the hidden states of a full batch of
    tokens, or the logits of a decode step's sequences (a wider one goes through gloo)."""
    vocab_share = -(-model_config.vocab_size // config.tensor_parallel_size)
    capacity = max(config.max_num_batched_tokens * model_config.hidden_size,
                   config.max_num_seqs * vocab_share)
    return ShmExchange(config.tensor_parallel_size, capacity, COLLECTIVE_TIMEOUT.total_seconds())


def _start_ranks(model: nn.Module, config, init_method: str, ranks, ranks_on_node: int,
                 threads: int, shm: ShmExchange | None = None) -> list:
    """Spawn one worker process per rank in ``ranks``; the model travels to them through shared
    memory (``torch.multiprocessing``), each cuts its own share of it."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    processes = []
    for rank in ranks:
        process = context.Process(
            target=_worker_main, name=f"mlx-serve-tp-rank{rank}", daemon=True,
            args=(model, config, rank, rank % ranks_on_node, init_method, threads, shm,
                  os.getpid()))
        process.start()
        processes.append(process)
    return processes


def _worker_main(model: nn.Module, config, rank: int, local_rank: int, init_method: str,
                 threads: int, shm: ShmExchange | None, parent_pid: int) -> None:
    from mlx_serve.lora import LoraManager
    from mlx_serve.model_runner import ModelRunner

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when the workers stop
    device = model.device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(threads)
    dist.init_process_group(_backend(device), init_method=init_method, rank=rank,
                            world_size=config.tensor_parallel_size, timeout=COLLECTIVE_TIMEOUT)
    try:
        if shm is not None:
            shm.alive = parent_alive(parent_pid)  # not wait forever for a rank 0 that is gone
        shard_model(model, rank, config.tensor_parallel_size, shm=shm)
        model.to(device)
        num_blocks = _receive()
        runner = ModelRunner(model, num_blocks, config.block_size, config.prepack_weights,
                             config.fuse_projections,
                             cache_dtype=config.cache_dtype(model.dtype, model.device))
        # the same loads and unloads as rank 0's, in its order: the same slots
        runner.loras = LoraManager(model, config.max_loras, config.max_lora_rank)
        while (message := _receive()) is not None:
            kind, *payload = message
            if kind == "step":
                runner.run(*payload)
            elif kind == "embed":
                runner.embed(*payload)
            elif kind == "lora_load":
                runner.loras.load(*payload)
            elif kind == "lora_unload":
                runner.loras.unload(*payload)
            else:
                raise ValueError(f"unknown tensor-parallel message {kind!r}")
    finally:
        dist.destroy_process_group()


def _receive():
    box = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_node(model: nn.Module, config, node_rank: int) -> int:
    """Run the ranks of node ``node_rank`` (> 0) of a multi-node tensor-parallel engine until
    rank 0 stops them; the worst exit code of those ranks."""
    world, nnodes = config.tensor_parallel_size, config.nnodes
    check_parallel_options(world, nnodes, node_rank)
    if node_rank == 0:
        raise ValueError("node 0 runs the engine and the server: start it without --node-rank")
    if config.master_port is None:
        raise ValueError("the other nodes join node 0 at --master-addr/--master-port: give both")
    ranks_on_node = world // nnodes
    first = node_rank * ranks_on_node
    processes = _start_ranks(model, config, f"tcp://{config.master_addr}:{config.master_port}",
                             range(first, first + ranks_on_node), ranks_on_node,
                             _threads_per_rank(ranks_on_node))
    codes = []
    for process in processes:
        process.join()
        codes.append(process.exitcode)
    return max(abs(code or 0) for code in codes)


__all__ = ["TensorParallelGroup", "WorkerDied", "check_parallel_options", "run_node"]
