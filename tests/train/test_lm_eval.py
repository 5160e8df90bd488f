"""lm-evaluation-harness on mlx models (``mlx_train.lm_eval``): on the shipped tasks our
log-likelihoods equal the harness's own ``hf`` model on the same HF directory (to 1e-4, with
identical accuracies and generations), with and without a LoRA adapter; the serving-engine and
JAX backends equal the torch one; ``mlx eval`` end to end; a user's task by --include-path."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("lm_eval")

from mlx_train.lm_eval.evaluate import evaluate, flat_scores, score_rows  # noqa: E402

TASKS = ("mlx_arithmetic", "mlx_austen", "mlx_code_book")
LIMIT = 6


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random tiny Llama with a byte-level tokenizer, its weights large enough (std 0.1) that
    choices differ clearly in likelihood, saved as an HF directory."""
    from mlx_core import load_model, load_tokenizer, save_model
    from tests.serve.helpers import byte_level_model_dir

    base = byte_level_model_dir(tmp_path_factory.mktemp("tiny"))
    torch.manual_seed(0)
    model = load_model(base)
    model.reset_parameters(std=0.1)
    return save_model(model, tmp_path_factory.mktemp("tiny-peaked") / "m",
                      tokenizer=load_tokenizer(base).hf)


@pytest.fixture(scope="module")
def tiny_adapter(tiny_dir, tmp_path_factory):
    """A LoRA adapter (PEFT format) with non-zero B, so it changes the scores."""
    from mlx_adapters import LoraConfig, get_peft_model
    from mlx_core import load_model

    torch.manual_seed(1)
    peft = get_peft_model(load_model(tiny_dir), LoraConfig(r=4, lora_alpha=8,
                                                           target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    directory = tmp_path_factory.mktemp("adapter") / "adapter"
    peft.save_pretrained(directory)
    return directory


def _run(model, backend="torch", adapter=None, tasks=TASKS, limit=LIMIT, **options):
    """Per task: the logged samples' responses; and the scores."""
    from lm_eval import simple_evaluate

    from mlx_train.lm_eval.evaluate import task_manager

    if model == "hf":
        args = {"pretrained": str(options["pretrained"]), "dtype": "float32", "device": "cpu",
                "batch_size": 4}
        if adapter is not None:
            args["peft"] = str(adapter)
        results = simple_evaluate(model="hf", model_args=args, tasks=list(tasks),
                                  task_manager=task_manager(tasks), limit=limit,
                                  bootstrap_iters=0, log_samples=True)
    else:
        results = evaluate(model, list(tasks), backend=backend, adapter=adapter, limit=limit,
                           bootstrap_iters=0, log_samples=True, batch_size=3)
    responses = {t: [s["resps"] for s in results["samples"][t]] for t in tasks}
    return responses, flat_scores(results)


def _assert_same(ours, reference, tol=1e-4):
    """Log-likelihoods within ``tol`` (plus a few float32 steps of a passage's total, for the
    rolling ones: thousands of nats, where one step is 2.4e-4 and one side may be summed in
    float32, the other in float64), greedy flags and generated texts identical."""
    ours_resps, ours_scores = ours
    ref_resps, ref_scores = reference
    worst = 0.0
    for task, docs in ref_resps.items():
        assert len(ours_resps[task]) == len(docs)
        for mine, theirs in zip(ours_resps[task], docs, strict=True):
            for a, b in zip(mine, theirs, strict=True):
                a, b = a[0], b[0]
                if isinstance(b, str):
                    assert a == b, task
                elif isinstance(b, (tuple, list)):  # (loglikelihood, is_greedy)
                    assert abs(a[0] - b[0]) <= tol and a[1] == b[1], (task, a, b)
                    worst = max(worst, abs(a[0] - b[0]))
                else:  # a rolling log-likelihood: a float32 sum of a whole passage's tokens
                    assert abs(a - b) <= tol + 5e-7 * abs(b), (task, a, b)
                    worst = max(worst, abs(a - b))
    for key in ("mlx_arithmetic/acc", "mlx_arithmetic/acc_norm", "mlx_code_book/exact_match"):
        if key in ref_scores:
            assert ours_scores[key] == ref_scores[key], key
    return worst


@pytest.mark.hf_parity
def test_loglikelihoods_equal_lm_evals_hf_model(tiny_dir):
    worst = _assert_same(_run(str(tiny_dir)), _run("hf", pretrained=tiny_dir))
    print(f"max |ours - hf| = {worst:.2e}")


@pytest.mark.hf_parity
def test_an_adapter_equals_hf_with_peft_and_the_serve_backend(tiny_dir, tiny_adapter):
    tasks = ("mlx_arithmetic", "mlx_austen")
    torch_run = _run(str(tiny_dir), adapter=tiny_adapter, tasks=tasks)
    _assert_same(torch_run, _run("hf", pretrained=tiny_dir, adapter=tiny_adapter, tasks=tasks))
    _assert_same(_run(str(tiny_dir), backend="serve", adapter=tiny_adapter, tasks=tasks),
                 torch_run)
    base = _run(str(tiny_dir), tasks=("mlx_austen",))[1]
    assert base["mlx_austen/bits_per_byte"] != torch_run[1]["mlx_austen/bits_per_byte"]


def test_the_serve_backend_equals_torch_and_reuses_shared_contexts(tiny_dir):
    from mlx_train.lm_eval.evaluate import make_lm

    _assert_same(_run(str(tiny_dir), backend="serve"), _run(str(tiny_dir)))
    lm = make_lm(str(tiny_dir), backend="serve", block_size=4)
    evaluate(lm, ["mlx_arithmetic"], limit=6, bootstrap_iters=0)
    blocks = lm.runner.llm.engine.blocks
    # four choices per question: three of them find the question in the prefix cache
    assert blocks.prefix_hits > 0.5 * blocks.prefix_queries


@pytest.mark.slow
def test_the_jax_backend_equals_torch(tiny_dir):
    pytest.importorskip("mlx_jax")
    tasks = ("mlx_arithmetic", "mlx_austen")
    _assert_same(_run(str(tiny_dir), backend="jax", tasks=tasks),
                 _run(str(tiny_dir), tasks=tasks))


def test_mlx_eval_prints_the_table_writes_json_and_runs_a_users_task(tiny_dir, tmp_path):
    from mlx_core.cli.app import build_app

    app = build_app()

    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    data = tasks / "colors.jsonl"
    data.write_text("".join(json.dumps({"q": f"Is {c} a color?", "label": 0}) + "\n"
                            for c in ("red", "blue", "green")))
    (tasks / "my_colors.yaml").write_text(
        "task: my_colors\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: ['yes', 'no']\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n")
    out = tmp_path / "results.json"
    result = CliRunner().invoke(app, ["eval", str(tiny_dir), "--tasks",
                                      "mlx_arithmetic,mlx_austen,my_colors", "--limit", "3",
                                      "--include-path", str(tasks), "--output", str(out)])
    assert result.exit_code == 0, result.output
    for text in ("mlx_arithmetic", "acc_norm", "bits_per_byte", "my_colors"):
        assert text in result.output
    saved = json.loads(out.read_text())
    assert set(saved["results"]) == {"mlx_arithmetic", "mlx_austen", "my_colors"}
    assert saved["mlx"]["backend"] == "torch"
    rows = score_rows(saved)
    assert {r["task"] for r in rows} == set(saved["results"]) and all(r["n"] == 3 for r in rows)


def test_bad_tasks_and_adapters_fail_clearly(tiny_dir, tmp_path):
    from mlx_core.cli.app import build_app

    app = build_app()

    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(tiny_dir), "--tasks", "mlx_arithmetc"])
    assert result.exit_code == 1
    assert "unknown task 'mlx_arithmetc' (did you mean mlx_arithmetic" in result.output
    result = runner.invoke(app, ["eval", str(tiny_dir), "--tasks", "mlx_arithmetic",
                                 "--adapter", str(tmp_path)])
    assert result.exit_code == 1 and "not a PEFT-format adapter directory" in result.output
    result = runner.invoke(app, ["eval", str(tiny_dir), "--tasks", "mlx_arithmetic",
                                 "--include-path", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "is not a directory" in result.output
    result = runner.invoke(app, ["eval", str(tiny_dir), "--backend", "tpu"])
    assert result.exit_code == 1 and "unknown backend 'tpu'" in result.output


def _lm_eval_console(*args, register="1"):
    """lm-eval's own console script in this environment, as a user runs it."""
    env = {**os.environ, "MLX_LM_EVAL_REGISTER": register}
    return subprocess.run([str(Path(sys.executable).parent / "lm_eval"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env)


def test_plain_lm_eval_runs_model_mlx(tiny_dir):
    """mlx-train's start-up hook registers ``mlx`` when lm_eval loads its models: the harness's
    own ``lm_eval --model mlx`` scores a shipped task; with the hook off, lm_eval lists its own
    models only (so it is the hook, not lm_eval, that finds ours)."""
    from mlx_train.lm_eval.task_data import TASKS_DIR

    args = ["--model", "mlx", "--model_args", f"pretrained={tiny_dir}", "--tasks",
            "mlx_arithmetic", "--include_path", TASKS_DIR, "--limit", "3"]
    done = _lm_eval_console(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"\|mlx_arithmetic\|.*\|acc\s+\|", done.stdout), done.stdout
    off = _lm_eval_console(*args, register="0")
    assert off.returncode != 0 and "no model for this name found" in off.stderr


def test_the_shipped_code_book_is_the_quickstarts_held_out_set():
    from mlx_train.lm_eval.task_data import TASKS_DIR, read_jsonl
    from mlx_train.quickstart import EVAL_ITEMS
    from mlx_train.recipes.tasks import secret_code_items

    _, valid = secret_code_items(0, EVAL_ITEMS)
    shipped = read_jsonl(TASKS_DIR / "code_book.jsonl")
    assert [f"Encode: {d['words']}" for d in shipped] == [v["instruction"] for v in valid]
    assert [d["answer"] for d in shipped] == [v["output"] for v in valid]


@pytest.mark.builtin_model
@pytest.mark.hf_parity
@pytest.mark.slow
def test_the_builtin_model_equals_lm_evals_hf_model(builtin_model_dir):
    tasks = ("mlx_arithmetic", "mlx_austen")
    worst = _assert_same(_run(str(builtin_model_dir), tasks=tasks, limit=8),
                         _run("hf", pretrained=builtin_model_dir, tasks=tasks, limit=8))
    print(f"built-in model: max |ours - hf| = {worst:.2e}")


def test_eval_lm_eval_adds_the_scores_to_a_runs_metrics_and_the_sweep_table(tiny_dir, tmp_path):
    from mlx_train import recipes
    from mlx_train.runner.multirun import table

    overrides = ["model=pretrained", f"model.source={tiny_dir}", "data=secret_code",
                 "data.n_train=16", "data.n_valid=4", "data.bs=8", "eval.exact_match=false",
                 "eval.samples=0", "train.progress=false", "save.checkpoint_every=0",
                 "eval=lm_eval", "eval.lm_eval.tasks=[mlx_arithmetic]", "eval.lm_eval.limit=3",
                 "eval.lm_eval.before=true", f"output_dir={tmp_path / 'sweep'}",
                 "optimizer.lr=1e-3,3e-2"]
    jobs = recipes.sweep("lora_finetune", overrides)
    assert not any(job.error for job in jobs), [job.error for job in jobs]
    for job in jobs:
        saved = json.loads((tmp_path / "sweep" / job.output_dir.rsplit("/", 1)[-1]
                            / "metrics.json").read_text())
        assert {"lm_eval/mlx_arithmetic/acc", "lm_eval_before/mlx_arithmetic/acc"} <= set(saved)
    columns = [c.header for c in table(jobs).columns]
    assert "lm_eval/mlx_arithmetic/acc" in columns and "lm_eval_before/mlx_arithmetic/acc" in columns
