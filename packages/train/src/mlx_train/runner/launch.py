"""Several processes per recipe: ``mlx train RECIPE --nproc N ...`` and the per-process entry.

``launch`` checks the config here (errors come before any process starts), then runs
``python -m torch.distributed.run --standalone --nproc_per_node N -m mlx_train.runner.launch
RECIPE overrides...``: torchrun's own launcher, the same as typing it. Each process runs
``main``, which runs the recipe; the recipe sees ``WORLD_SIZE`` and trains data-parallel (DDP,
or FSDP2 with ``train.strategy=fsdp``; see ``mlx_train.runner.scaleout``). Running this module
under ``torchrun`` yourself works the same (e.g. several nodes):

    torchrun --nproc_per_node 2 -m mlx_train.runner.launch full_finetune data.bs=16 ...
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# what torchrun sets for its workers: a launcher started inside one must not inherit them
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def command(recipe: str, overrides=(), config_dir=None, nproc: int = 2) -> list[str]:
    """The torchrun command line ``launch`` runs."""
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(nproc), "-m", "mlx_train.runner.launch", recipe]
    if config_dir is not None:
        args += ["--config-dir", str(config_dir)]
    return args + [str(o) for o in overrides or []]


def launch(recipe: str, overrides=(), config_dir=None, nproc: int = 2) -> dict:
    """Run recipe ``recipe`` on ``nproc`` processes of this machine; returns its final metrics
    (rank 0's ``metrics.json``). Raises ``RuntimeError`` when a process fails (their output,
    with the error, is above)."""
    from mlx_train import recipes

    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    from mlx_train.recipes.base import RunDir

    cfg = recipes.compose(recipe, overrides, config_dir)  # errors now, not in N processes
    if "output_dir" in cfg and "resume" in cfg:
        RunDir.check(cfg)
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    # torchrun would set 1 thread per process with a warning; share the cores out instead
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    done = subprocess.run(command(recipe, overrides, config_dir, nproc), env=env)
    if done.returncode:
        raise RuntimeError(f"{recipe} on {nproc} processes failed (exit status "
                           f"{done.returncode}); the failing process's error ('error:' or the "
                           "first [rankN] traceback) is above torchrun's summary")
    metrics = Path(cfg.output_dir).expanduser() / "metrics.json"
    return json.loads(metrics.read_text()) if metrics.is_file() else {}


def main(argv: list[str] | None = None) -> int:
    """One process: ``RECIPE [--config-dir DIR] overrides...``. An error the processes agree on
    (a bad config, a run directory to resume or not) is reported once, by rank 0."""
    import torch.distributed as dist

    from mlx_train import recipes
    from mlx_train.distributed import is_main_process

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        print("usage: python -m mlx_train.runner.launch RECIPE [--config-dir DIR] [key=value ...]"
              " (under torchrun)", file=sys.stderr)
        return 2
    recipe, rest, config_dir = args[0], args[1:], None
    if "--config-dir" in rest:
        i = rest.index("--config-dir")
        if i + 1 >= len(rest):
            print("--config-dir needs a directory", file=sys.stderr)
            return 2
        config_dir, rest = rest[i + 1], rest[:i] + rest[i + 2:]
    try:
        recipes.run(recipe, rest, config_dir)
    except (ValueError, FileExistsError, FileNotFoundError, KeyError) as e:
        if is_main_process():
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def exit_now(code: int) -> None:
    """End this process with ``code`` once its output is flushed, skipping interpreter teardown.

    ``destroy_process_group`` drops c10d's references, but a gloo group still held elsewhere
    (FSDP2's device mesh, a DDP reducer) is freed only at interpreter finalization, where its
    C++ worker threads have aborted a rank now and then ("terminate called without an active
    exception", SIGABRT) after a run that fully succeeded (pytorch/pytorch#179291 describes it).
    A worker has nothing else to clean up by then: rank 0 wrote its files before returning."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
