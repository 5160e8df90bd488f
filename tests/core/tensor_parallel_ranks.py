"""What each rank of the tensor-parallel tests runs (a module of its own: spawned processes
import it by name)."""

from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist


def run_ranks(function, world_size: int, *args, timeout: float = 240.0) -> list:
    """``function(rank, world_size, *args)`` in ``world_size`` spawned processes joined in a
    gloo group on 127.0.0.1; each rank's return value (an exception raised in a rank is raised
    here with its traceback)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_rank_main, args=(function, rank, world_size, port,
                                                          results, args))
                 for rank in range(world_size)]
    for p in processes:
        p.start()
    try:
        answers = dict(results.get(timeout=timeout) for _ in processes)
    finally:
        for p in processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    failures = [a for a in answers.values() if isinstance(a, str) and a.startswith("Traceback")]
    if failures:
        raise AssertionError("a rank failed:\n" + failures[0])
    return [answers[r] for r in range(world_size)]


def _rank_main(function, rank, world_size, port, results, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        results.put((rank, function(rank, world_size, *args)))
    except BaseException:
        results.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def sharded_logits_and_tokens(rank: int, world_size: int, families: list[str],
                              shm=None) -> dict:
    """Per family: the largest |logit| difference of the sharded model against the whole one
    (a prompt batch, then two cached decode steps), and whether greedy generation matched."""
    from mlx_core import build_model, generate, get_preset
    from mlx_core.transforms.tensor_parallel import shard_model

    out = {}
    for family in families:
        torch.manual_seed(0)
        model = build_model(get_preset(family)).eval()
        for p in model.parameters():  # weights large enough that a wrong split shows
            p.data.normal_(0, 0.2 if p.dim() > 1 else 0.5)
        model.tie_weights()
        prompts = [[5, 9, 17, 33, 2, 64, 100], [7, 1, 90]]
        ids = torch.tensor([prompts[0]])
        with torch.inference_mode():
            whole = model(ids)
            whole_tokens = generate(model, prompts, max_new_tokens=6)
            shard_model(model, rank, world_size, shm=shm)
            sharded = model(ids)
            tokens = generate(model, prompts, max_new_tokens=6)
        out[family] = (float((whole - sharded).abs().max()), tokens == whole_tokens,
                       model.config.kv_heads)
    return out


def sharded_quantized_logits(rank: int, world_size: int, cases: list[tuple[str, str]]) -> dict:
    """Per ``(family, scheme)``: the largest |logit| difference of the sharded quantized model
    against the whole quantized model, the largest |logit|, and the first layer's q_proj and
    o_proj de-quantized, whole and this rank's share."""
    import dataclasses

    from mlx_core import build_model, generate, get_preset
    from mlx_core.transforms import quantize
    from mlx_core.transforms.tensor_parallel import shard_model

    out = {}
    for family, scheme in cases:
        torch.manual_seed(0)
        # 128 intermediate features: two ranks' halves are whole int4 groups of 32
        model = build_model(dataclasses.replace(get_preset(family), intermediate_size=128)).eval()
        for p in model.parameters():
            p.data.normal_(0, 0.2 if p.dim() > 1 else 0.5)
        model.tie_weights()
        quantize(model, scheme)
        prompts = [[5, 9, 17, 33, 2, 64, 100], [7, 1, 90]]
        ids = torch.tensor([prompts[0]])
        attention = model.model.layers[0].self_attn

        def weights(attention=attention):
            # numpy arrays: they travel back by value (a tensor would by shared memory, gone
            # with the rank's process)
            return [attention.q_proj.dequantized_weight().numpy(),
                    attention.o_proj.dequantized_weight().numpy()]

        with torch.inference_mode():
            whole, whole_weights = model(ids), weights()
            shard_model(model, rank, world_size)
            sharded = model(ids)
            generate(model, prompts, max_new_tokens=6)  # the cached decode runs
        out[f"{family}/{scheme}"] = (float((whole - sharded).abs().max()),
                                     float(whole.abs().max()), whole_weights, weights())
    return out
