"""Several sweep jobs at once on this machine: ``mlx train RECIPE -m ... --jobs N``.

The jobs run in a pool of ``N`` worker processes (``concurrent.futures.ProcessPoolExecutor``,
started with ``spawn``: a forked copy of a process that already runs torch's thread pools is
not safe). Each worker gets its share of the cores, ``cpu_count // N`` threads
(``OMP_NUM_THREADS`` and ``torch.set_num_threads``), set before the job's first tensor, so N
jobs do not fight over the same cores. Every job composes and runs the same config as it would
one after another, in the same directory; its console output goes to ``output_dir/job.log``
(N interleaved progress bars would be unreadable), and this process prints one line as each job
ends. A job that fails is recorded, the others go on.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from pathlib import Path

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
JOB_LOG = "job.log"


def threads_per_job(n_jobs: int, cpus: int | None = None) -> int:
    """Each of ``n_jobs`` concurrent jobs' share of the cores (at least 1)."""
    return max(1, (cpus or os.cpu_count() or 1) // n_jobs)


def _start_worker(threads: int) -> None:
    # before torch is imported in this worker, so its pools start at this size
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    import torch

    torch.set_num_threads(threads)


@contextlib.contextmanager
def _output_to(path: Path):
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C++ warnings and
    progress bars too) to ``path`` within the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_job(recipe, overrides: list[str], config_dir, output_dir: str) -> tuple[dict, str]:
    """One job in a worker: ``(metrics, "")``, or ``({}, error)`` when it failed (the traceback
    is in its log)."""
    from mlx_train.runner.config import compose_config

    log = Path(output_dir).expanduser() / JOB_LOG
    log.parent.mkdir(parents=True, exist_ok=True)
    with _output_to(log):
        try:
            return recipe(compose_config(recipe, overrides, config_dir)), ""
        except Exception as e:  # noqa: BLE001 - reported to the parent, which records the job
            traceback.print_exc()
            return {}, f"{type(e).__name__}: {e}"


def run_parallel(recipe, jobs, config_dir=None, n_jobs: int = 2) -> None:
    """Run ``jobs`` (``multirun.Job``) ``n_jobs`` at a time; fills each job's ``metrics`` or
    ``error``."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    from rich.markup import escape

    from mlx_train.recipes.base import say

    workers = min(n_jobs, len(jobs))
    threads = threads_per_job(workers)
    say(f"{workers} jobs at a time, {threads} thread(s) each; each job's output goes to its "
        f"output_dir/{JOB_LOG}")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(threads,))
    try:
        futures = {pool.submit(run_job, recipe, job.overrides, config_dir, job.output_dir): i
                   for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            i, job = futures[future], jobs[futures[future]]
            try:
                job.metrics, job.error = future.result()
            except BrokenProcessPool as e:  # a worker died (killed, out of memory)
                job.error = f"the worker process died: {e}"
            shown = escape(" ".join(f"{k}={v}" for k, v in job.swept.items()))
            if job.error:
                say(f"[red]job {i} failed[/red] ({shown}): {escape(job.error)} (log: "
                    f"{escape(str(Path(job.output_dir) / JOB_LOG))})")
            else:
                say(f"job {i} done ({shown})")
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


__all__ = ["JOB_LOG", "run_job", "run_parallel", "threads_per_job"]
