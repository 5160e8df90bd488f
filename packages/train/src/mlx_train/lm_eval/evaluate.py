"""``evaluate(model, tasks, ...)``: run lm-evaluation-harness tasks on an mlx model; the
results' rich table, their JSON, and the flat ``task/metric`` scores a training run records.

Tasks are looked up in the shipped tasks and the ``include_path`` directories first; only a
name found in neither loads the harness's own task index (about 15,000 configs: tens of
seconds), whose tasks then download their data from the HF hub where the network allows.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from rich.table import Table

from mlx_train.lm_eval.task_data import TASKS_DIR

BACKENDS = ("torch", "serve", "jax")


class UnknownTaskError(ValueError):
    pass


def _task_names(manager) -> set[str]:
    return set(manager.all_tasks)  # tasks, groups and tags


def task_manager(tasks: Sequence[str], include_path: Sequence[str | Path] = ()):
    """A ``TaskManager`` that knows ``tasks``: over the shipped tasks and ``include_path``
    alone when they hold them all, else over the harness's own tasks too."""
    from lm_eval.tasks import TaskManager

    paths = [TASKS_DIR]
    for p in include_path:
        path = Path(p).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"--include-path {path} is not a directory: pass a folder of "
                                    "lm-eval task YAML files")
        paths.append(path)
    paths_arg = [str(p) for p in paths]
    local = TaskManager(include_path=paths_arg, include_defaults=False)
    local_names = _task_names(local)
    missing = [t for t in tasks if t not in local_names]
    if not missing:
        return local
    ours = [t for t in missing if t.startswith("mlx")]  # our namespace: no need to look further
    if ours:
        raise UnknownTaskError(_unknown(ours, local_names, include_path))
    full = TaskManager(include_path=paths_arg)
    names = _task_names(full)
    still = [t for t in missing if t not in names]
    if still:
        raise UnknownTaskError(_unknown(still, names, include_path))
    return full


def _unknown(names: list[str], known: set[str], include_path) -> str:
    parts = []
    for name in names:
        close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
        parts.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    where = "the shipped tasks (mlx_code_book, mlx_arithmetic, mlx_austen; tag mlx_shipped)"
    if include_path:
        where += ", " + ", ".join(str(p) for p in include_path)
    return (f"unknown task {', '.join(parts)}: not in {where} nor lm_eval's own tasks. "
            "Give your own task YAML's folder with --include-path DIR, or list tasks with "
            "`lm-eval ls tasks`")


def make_lm(model: str, *, adapter: str | None = None, backend: str = "torch",
            batch_size: int = 16, dtype: str = "float32", **options):
    """The harness model over ``model`` on ``backend`` (``torch``, ``serve``, ``jax``)."""
    from mlx_train.lm_eval import register
    from mlx_train.lm_eval.models import MlxLM, MlxServeLM

    register()
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    cls = MlxServeLM if backend == "serve" else MlxLM
    return cls(pretrained=str(model), adapter=None if adapter is None else str(adapter),
               backend=backend, batch_size=batch_size, dtype=dtype, **options)


def evaluate(model="smollm2-135m-instruct", tasks: Sequence[str] = ("mlx_shipped",), *,
             adapter: str | None = None, backend: str = "torch", limit: float | None = None,
             include_path: Sequence[str | Path] = (), batch_size: int = 16,
             dtype: str = "float32", chat_template: bool = False,
             system_instruction: str | None = None, num_fewshot: int | None = None,
             seed: int = 0, bootstrap_iters: int = 1000, log_samples: bool = False,
             verbose: bool = False, model_options: dict | None = None) -> dict:
    """Run ``tasks`` on ``model`` (a name, HF directory or ``.gguf`` file; or an ``MlxLM``
    already built) and return lm_eval's results dict (``results``, ``n-samples``,
    ``configs``, ...). ``chat_template``: render prompts through the model's chat template
    (lm_eval's ``apply_chat_template``); ``limit``: documents per task (a fraction if < 1)."""
    from lm_eval import simple_evaluate

    from mlx_train.lm_eval.models import MlxLM

    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    if not tasks:
        raise ValueError("no tasks given: pass --tasks (e.g. mlx_shipped, or mlx_arithmetic)")
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit must be positive, got {limit}")
    if not verbose:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    manager = task_manager(tasks, include_path)
    lm = model if isinstance(model, MlxLM) else make_lm(
        model, adapter=adapter, backend=backend, batch_size=batch_size, dtype=dtype,
        **(model_options or {}))
    results = simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
        num_fewshot=num_fewshot, apply_chat_template=chat_template,
        system_instruction=system_instruction, bootstrap_iters=bootstrap_iters,
        log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed)
    results["mlx"] = {"model": lm.pretrained, "adapter": lm.adapter, "backend": lm.runner.name,
                      "chat_template": bool(chat_template), "limit": limit}
    return results


def score_rows(results: dict) -> list[dict]:
    """One row per task and metric: ``task``, ``metric`` (``name`` or ``name,filter`` where the
    filter is not ``none``), ``value``, ``stderr``, ``n``, ``higher_is_better``."""
    rows = []
    for task, metrics in results.get("results", {}).items():
        better = results.get("higher_is_better", {}).get(task, {})
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            if key == "alias" or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            name, _, filter_name = key.partition(",")
            if name == "sample_len":  # the document count, shown as n
                continue
            stderr = metrics.get(f"{name}_stderr,{filter_name}")
            rows.append({"task": task, "metric": name if filter_name in ("", "none") else key,
                         "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                         "n": n, "higher_is_better": better.get(name)})
    return rows


def flat_scores(results: dict, prefix: str = "") -> dict[str, float]:
    """``{"<prefix><task>/<metric>": value}``: what a training run adds to its metrics."""
    return {f"{prefix}{r['task']}/{r['metric']}": r["value"] for r in score_rows(results)}


def results_table(results: dict, title: str = "mlx eval") -> Table:
    info = results.get("mlx", {})
    caption = ", ".join(f"{k}={v}" for k, v in info.items() if v not in (None, False))
    table = Table(title=title, caption=caption or None)
    for column in ("task", "metric", "value", "± stderr", "n", ""):
        table.add_column(column, justify="right" if column in ("value", "± stderr", "n") else "left")
    for r in score_rows(results):
        arrow = {True: "↑", False: "↓"}.get(r["higher_is_better"], "")
        table.add_row(r["task"], r["metric"], _number(r["value"]),
                      "" if r["stderr"] is None else f"{r['stderr']:.2g}",
                      "" if r["n"] is None else str(r["n"]), arrow)
    return table


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"


def to_json(results: dict) -> str:
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)


__all__ = ["UnknownTaskError", "evaluate", "flat_scores", "make_lm", "results_table",
           "score_rows", "task_manager", "to_json"]
