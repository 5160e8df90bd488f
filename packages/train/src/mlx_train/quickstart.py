"""``mlx quickstart``: the main job in one command, on a fresh install.

Loads the built-in ``smollm2-135m-instruct`` (pulled and converted on first use), scores its
exact-match accuracy on held-out items of the built-in secret-code task
(``mlx_train.recipes.tasks``), LoRA-tunes it with the ``lora_finetune`` recipe for a few
minutes on the CPU, scores it again, saves the adapter (PEFT format) and prints a held-out
sample answered with and without the adapter. It is the recipe with these overrides, so
``mlx train lora_finetune data=secret_code eval.before=true ...`` does the same.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.markup import escape
from rich.table import Table

BATCH = 8
DEFAULT_STEPS = 40
QUICK_STEPS = 6
EVAL_ITEMS = 48
QUICK_EVAL_ITEMS = 8


def free_output_dir(base: str = "mlx-quickstart") -> Path:
    """``./mlx-quickstart``, or ``./mlx-quickstart-2``, ... when it is taken."""
    path, n = Path(base), 1
    while path.exists():
        n += 1
        path = Path(f"{base}-{n}")
    return path


def overrides(steps: int, output: Path, quick: bool, model: str) -> list[str]:
    """The ``lora_finetune`` overrides a quickstart run uses."""
    from mlx_train.runner.config import quote

    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    n_eval = QUICK_EVAL_ITEMS if quick else EVAL_ITEMS
    model_override = ["model=smollm2-135m-instruct"] if model == "smollm2-135m-instruct" \
        else ["model=pretrained", f"model.source={quote(model)}"]
    return [*model_override, "adapter=lora", "data=secret_code",
            f"data.n_train={steps * BATCH}", f"data.n_valid={n_eval}", f"data.bs={BATCH}",
            "epochs=1", "optimizer=adamw", "optimizer.lr=4e-3", "scheduler=one_cycle",
            "eval.before=true", "eval.exact_match=true", f"eval.max_examples={n_eval}",
            "eval.max_new_tokens=8", "eval.samples=1",
            "save.checkpoint_every=0",  # the adapter is the result; no 0.5 GB training state
            f"output_dir={quote(output)}"]


def quickstart(steps: int | None = None, output: str | Path | None = None, quick: bool = False,
               model: str = "smollm2-135m-instruct") -> dict:
    """Run the quickstart; returns the run's metrics (``base_exact_match``, ``exact_match``, ...)."""
    from mlx_train import recipes
    from mlx_train.recipes.base import console, say
    from mlx_train.recipes.tasks import CODE_BOOK

    steps = steps or (QUICK_STEPS if quick else DEFAULT_STEPS)
    output = Path(output) if output is not None else free_output_dir()
    say(f"[bold]mlx quickstart[/bold]: LoRA-tune {escape(model)} on a made-up code book "
        f"({', '.join(f'{k} -> {v}' for k, v in list(CODE_BOOK.items())[:3])}, ...) for {steps} "
        f"steps of {BATCH}; held-out word combinations are scored before and after.")
    started = time.time()
    metrics = recipes.run("lora_finetune", overrides(steps, output, quick, model))
    total = time.time() - started
    table = Table(title="mlx quickstart")
    table.add_column("")
    table.add_column("value")
    table.add_row("exact match, base model", f"{metrics['base_exact_match']:.1%}")
    table.add_row("exact match, with adapter", f"{metrics['exact_match']:.1%}")
    table.add_row("validation loss", f"{metrics['valid_loss']:.4f}")
    table.add_row("training", f"{steps} steps, {metrics['train_s']:.0f} s")
    table.add_row("total time", f"{total:.0f} s")
    table.add_row("adapter (PEFT format)", str(output / "adapter"))
    console.print(table)
    say(f"next: mlx adapters inspect {escape(str(output / 'adapter'))}  |  mlx recipes list  |  "
        "mlx train lora_finetune data=instruct data.train_files=YOUR.jsonl")
    metrics["total_s"] = round(total, 1)
    return metrics


__all__ = ["quickstart"]
