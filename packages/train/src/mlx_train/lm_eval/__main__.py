"""``python -m mlx_train.lm_eval ARGS``: lm_eval's own command line (``lm_eval run ...``) with
the ``mlx`` and ``mlx-serve`` models registered and the shipped tasks' directory included
(unless ``--include_path`` is given), e.g.

    python -m mlx_train.lm_eval --model mlx --model_args pretrained=smollm2-135m-instruct \\
        --tasks mlx_arithmetic --limit 8

A plain ``lm_eval --model mlx`` works too, through the start-up hook that mlx-train installs
(``_mlx_train_lm_eval``); this entry point needs no hook and includes the shipped tasks.
"""

from __future__ import annotations

import sys


def main() -> None:
    from mlx_train.lm_eval import register
    from mlx_train.lm_eval.task_data import TASKS_DIR

    register()
    if len(sys.argv) > 1 and "--include_path" not in sys.argv and \
            not any(a.startswith("--include_path=") for a in sys.argv):
        sys.argv += ["--include_path", str(TASKS_DIR)]
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
