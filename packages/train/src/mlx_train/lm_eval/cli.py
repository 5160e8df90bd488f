"""``mlx eval MODEL --tasks ...``: lm-evaluation-harness tasks on an mlx model (with an
adapter, on the torch, serving or JAX backend); a rich table of the scores, and their JSON."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from mlx_core.cli import clean_errors

console = Console()


@clean_errors
def eval_command(
        model: str = typer.Argument("smollm2-135m-instruct",
                                    help="A registered model name, an HF-format directory or a "
                                         ".gguf file."),
        tasks: str = typer.Option("mlx_shipped", "--tasks", "-t",
                                  help="Comma-separated lm-eval task, group or tag names: the "
                                       "shipped mlx_code_book, mlx_arithmetic, mlx_austen (tag "
                                       "mlx_shipped), your own (--include-path) or lm_eval's "
                                       "(their data comes from the HF hub)."),
        adapter: Path = typer.Option(None, "--adapter",
                                     help="A PEFT-format adapter directory (a tuning run's "
                                          "'adapter' folder) to apply to MODEL."),
        backend: str = typer.Option("torch", "--backend",
                                    help="torch (the zoo model), serve (the serving engine: "
                                         "continuous batching, prefix cache) or jax (mlx-jax)."),
        limit: float = typer.Option(None, "--limit", help="Documents per task (a fraction if "
                                                          "below 1); for quick checks."),
        include_path: list[Path] = typer.Option(None, "--include-path",
                                                help="A folder of your own lm-eval task YAML "
                                                     "(repeatable)."),
        chat_template: bool = typer.Option(False, "--chat-template",
                                           help="Render prompts through the model's chat "
                                                "template (lm_eval's --apply_chat_template); "
                                                "mlx_code_book needs it."),
        system_instruction: str = typer.Option(None, "--system-instruction",
                                               help="A system message before every prompt."),
        num_fewshot: int = typer.Option(None, "--num-fewshot", help="Few-shot examples."),
        batch_size: int = typer.Option(16, "--batch-size", help="Rows per forward (torch, jax)."),
        dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
        seed: int = typer.Option(0, "--seed"),
        output: Path = typer.Option(None, "--output", "-o",
                                    help="Write the full results (lm_eval's JSON) here."),
        log_samples: bool = typer.Option(False, "--log-samples",
                                         help="Keep every document's prompt and answers in the "
                                              "JSON."),
        verbose: bool = typer.Option(False, "--verbose", help="lm_eval's own log messages.")):
    """Evaluate MODEL on lm-evaluation-harness tasks; print the scores, optionally save JSON."""
    from mlx_train.lm_eval.evaluate import evaluate, results_table, to_json

    results = evaluate(model, [t.strip() for t in tasks.split(",") if t.strip()],
                       adapter=None if adapter is None else str(adapter), backend=backend,
                       limit=limit, include_path=include_path or (), batch_size=batch_size,
                       dtype=dtype, chat_template=chat_template,
                       system_instruction=system_instruction, num_fewshot=num_fewshot,
                       seed=seed, log_samples=log_samples, verbose=verbose)
    console.print(results_table(results))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(to_json(results))
        console.print(f"wrote {output}", highlight=False, markup=False)


__all__ = ["eval_command"]
