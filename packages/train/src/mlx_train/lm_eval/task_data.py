"""The tasks this package ships (lm-eval YAML + JSONL under ``builtin_tasks/``) and the loader
their YAML names, so they run with no hub and no network.

- ``mlx_code_book``: the quickstart's held-out secret-code items (``mlx_train.recipes.tasks``),
  answered by greedy generation and scored by exact match; run it with the chat template
  (``mlx eval --chat-template``), as the quickstart's adapter was trained in it.
- ``mlx_arithmetic``: two-number sums as four-way multiple choice (accuracy from the
  log-likelihood of each choice after a shared question).
- ``mlx_austen``: rolling log-likelihood (word and byte perplexity, bits per byte) of the first
  chapter of Jane Austen's *Pride and Prejudice* (1813, public domain).

All three carry the tag ``mlx_shipped``.
"""

from __future__ import annotations

import json
from pathlib import Path

TASKS_DIR = Path(__file__).parent / "builtin_tasks"
SHIPPED_TAG = "mlx_shipped"
SHIPPED_TASKS = ("mlx_code_book", "mlx_arithmetic", "mlx_austen")


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON object ({e})") from None
    return rows


def load_shipped(data_files: str | None = None, **_metadata):
    """The ``test`` split of a JSONL file in ``builtin_tasks/`` (a task YAML's
    ``custom_dataset``, called with its ``dataset_kwargs`` and metadata)."""
    import datasets

    if not data_files:
        raise ValueError("a shipped task names its JSONL file in dataset_kwargs.data_files")
    path = TASKS_DIR / data_files
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_jsonl(path))})


__all__ = ["SHIPPED_TAG", "SHIPPED_TASKS", "TASKS_DIR", "load_shipped", "read_jsonl"]
