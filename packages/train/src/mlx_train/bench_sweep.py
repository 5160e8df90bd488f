"""``mlx bench sweep``: the wall time of a sweep of tiny pretraining jobs run one after another
(``--jobs 1``) against the same sweep run N at a time (``--jobs N``, each job with its share of
the cores), and whether every job ended with the same metrics.

The jobs are ``pretrain`` runs of the ``tiny-llama`` preset on generated text (no download),
one per learning rate. Each side runs the whole sweep in a fresh directory; the ratio is
``parallel_s / sequential_s`` (the goal on a quiet 2-core machine: <= 0.65 for 4 jobs and
``--jobs 2``). Worker start-up (a spawned Python importing torch) counts against the parallel
side, as it does for a user.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import typer

WORDS = ["cat", "dog", "fox", "owl", "bee", "ant", "elk", "yak", "emu", "cod"]
VERBS = ["sees", "follows", "meets", "hears", "finds"]


def write_texts(directory: Path, files: int = 4, sentences: int = 6000, seed: int = 0) -> Path:
    """``files`` text files of generated sentences (a tiny pretraining corpus)."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (directory / f"{i}.txt").write_text(" ".join(
            f"the {rng.choice(WORDS)} {rng.choice(VERBS)} the {rng.choice(WORDS)}."
            for _ in range(sentences)))
    return directory


def sweep_overrides(texts: Path, out: Path, n_jobs_in_sweep: int, epochs: int) -> list[str]:
    lrs = ",".join(f"{3e-3 * (1.5 ** i):.6g}" for i in range(n_jobs_in_sweep))
    return [f"data.path={texts}", "data.seq_len=64", "data.vocab_size=400", f"epochs={epochs}",
            "train.progress=false", "logger=none", "save.checkpoint_every=0",
            f"output_dir={out}", f"optimizer.lr={lrs}"]


def run(n_jobs_in_sweep: int = 4, jobs: int = 2, epochs: int = 3, sentences: int = 6000,
        directory: str | None = None) -> dict:
    """Time the sweep with ``--jobs 1`` and ``--jobs jobs``; compare the jobs' metrics."""
    from mlx_train import recipes
    from mlx_train.runner.parallel import _output_to, threads_per_job

    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        root = Path(tmp)
        texts = write_texts(root / "texts", sentences=sentences)
        times, results = {}, {}
        for n in (1, jobs):
            out = root / f"jobs{n}"
            out.mkdir()
            started = time.perf_counter()
            with _output_to(out / "sweep.log"):  # the jobs' own lines would drown the result
                results[n] = recipes.sweep("pretrain", sweep_overrides(texts, out, n_jobs_in_sweep,
                                                                       epochs), jobs=n)
            times[n] = time.perf_counter() - started
    errors = [j.error for n in results for j in results[n] if j.error]
    if errors:
        raise RuntimeError(f"sweep jobs failed: {errors}")
    diff = max(abs(a.metrics[k] - b.metrics[k]) / abs(a.metrics[k])
               for a, b in zip(results[1], results[jobs], strict=True)
               for k in ("train_loss", "valid_loss"))
    return {"jobs_in_sweep": n_jobs_in_sweep, "jobs": jobs, "epochs": epochs,
            "threads_per_job": threads_per_job(jobs), "sequential_s": times[1],
            "parallel_s": times[jobs], "ratio": times[jobs] / times[1],
            "job_seconds": [j.metrics.get("time_s") for j in results[1]],
            "max_relative_metric_difference": diff}


def bench_sweep(n: int = typer.Option(4, "--n", help="Jobs in the sweep (learning rates)."),
                jobs: int = typer.Option(2, "--jobs", help="Jobs at a time on the parallel "
                                         "side."),
                epochs: int = typer.Option(3, "--epochs", help="Epochs per job."),
                sentences: int = typer.Option(6000, "--sentences", help="Sentences per text "
                                              "file (4 files): the size of each job."),
                json_path: str = typer.Option("", "--json", help="Also write the result here.")):
    """A sweep's wall time with --jobs N vs one job after another (ratio; goal <= 0.65 for 4
    tiny jobs and --jobs 2 on 2 cores), and the jobs' metrics compared."""
    import json

    from rich.console import Console
    from rich.table import Table

    result = run(n, jobs, epochs, sentences)
    table = Table("run", "wall (s)", title=f"mlx bench sweep: {n} pretrain jobs (tiny-llama, "
                  f"{epochs} epochs each)")
    table.add_row("--jobs 1 (one after another)", f"{result['sequential_s']:.1f}")
    table.add_row(f"--jobs {jobs} ({result['threads_per_job']} thread(s) each)",
                  f"{result['parallel_s']:.1f}")
    Console().print(table)
    print(f"ratio (--jobs {jobs} / --jobs 1): {result['ratio']:.3f}  largest relative difference "
          f"of a job's metrics: {result['max_relative_metric_difference']:.1e}")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))


__all__ = ["bench_sweep", "run", "sweep_overrides", "write_texts"]
