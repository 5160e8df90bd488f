"""Evaluation through EleutherAI's lm-evaluation-harness (``pip install 'mlx-train[eval]'``).

- ``models``: the harness's model classes ``mlx`` (the zoo on torch, or JAX with
  ``backend=jax``) and ``mlx-serve`` (the serving engine, with its batching and prefix cache),
  each with an optional PEFT-format adapter; ``runners``: what runs the model for each backend.
- ``task_data``: the tasks shipped in ``builtin_tasks/`` (lm-eval YAML + JSONL, no hub needed).
- ``evaluate``: ``evaluate(model, tasks, ...)`` -> the harness's results, their table, the
  flat scores a training run records; ``cli``: ``mlx eval``.

lm_eval 0.4 finds models only in its own list (it reads no entry points), so ``register()``
adds ours to its registry in this process. The start-up hook that the wheel installs
(``_mlx_train_lm_eval``, run by ``mlx_train_lm_eval.pth``) calls it when lm_eval loads its models,
so a plain ``lm_eval --model mlx`` and ``lm_eval.simple_evaluate(model="mlx", ...)`` find ours;
``mlx eval`` and ``python -m mlx_train.lm_eval`` call it themselves (they work with the hook off,
``MLX_LM_EVAL_REGISTER=0``).
"""

from __future__ import annotations

MODELS = {"mlx": "mlx_train.lm_eval.models:MlxLM",
          "mlx-serve": "mlx_train.lm_eval.models:MlxServeLM"}


def register() -> None:
    """Add ``mlx`` and ``mlx-serve`` to lm_eval's model registry (lazily: the classes import
    when the harness asks for them). Idempotent."""
    try:
        import lm_eval.models  # noqa: F401  (the harness's own models first: it fills an empty registry only)
        from lm_eval.api.registry import model_registry
    except ImportError:
        raise ImportError("evaluation needs lm-evaluation-harness: pip install 'mlx-train[eval]' "
                          "(or pip install lm-eval)") from None
    for name, target in MODELS.items():
        if name not in model_registry:
            model_registry.register(name, target=target)


__all__ = ["MODELS", "register"]
