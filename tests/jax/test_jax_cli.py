"""``mlx generate --backend jax`` and ``mlx chat --backend jax``: the greedy text is the torch
backend's, character for character; the jax backend runs without torch; a missing mlx-jax or an
unknown backend is a one-line error."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mlx_core.cli.app import build_app

runner = CliRunner()


def invoke(*args, input=None):
    return runner.invoke(build_app(), list(args), input=input)


@pytest.mark.parametrize("chat", ["--chat", "--no-chat"])
def test_generate_jax_prints_the_torch_text(tiny_model_dir, chat):
    args = ("generate", "-m", str(tiny_model_dir), "-p", "hello there hi", "-n", "12", chat)
    torch_run = invoke(*args)
    jax_run = invoke(*args, "--backend", "jax")
    assert torch_run.exit_code == 0 and jax_run.exit_code == 0, jax_run.output
    assert jax_run.output == torch_run.output
    assert len(jax_run.output.split()) >= 6  # it did generate words, not only a stop token


def test_chat_jax_replies_as_torch_does(tiny_model_dir):
    turns = "hi\nhello there\n/reset\nhi hi\n/exit\n"
    args = ("chat", "-m", str(tiny_model_dir), "--system", "be brief", "-n", "6")
    torch_run = invoke(*args, input=turns)
    jax_run = invoke(*args, "--backend", "jax", input=turns)
    assert torch_run.exit_code == 0 and jax_run.exit_code == 0, jax_run.output
    assert jax_run.output == torch_run.output
    assert "(conversation cleared)" in jax_run.output


def test_jax_sampling_is_seeded(tiny_model_dir):
    args = ("generate", "-m", str(tiny_model_dir), "-p", "hi", "-n", "8", "--backend", "jax",
            "-t", "1.0")
    first = invoke(*args, "--seed", "3")
    assert first.exit_code == 0, first.output
    assert invoke(*args, "--seed", "3").output == first.output
    assert invoke(*args).exit_code == 0  # no seed: a fresh one is drawn


def test_unknown_backend_and_missing_mlx_jax_are_clean_errors(tiny_model_dir, monkeypatch):
    bad = invoke("generate", "-m", str(tiny_model_dir), "-p", "hi", "--backend", "tpu")
    assert bad.exit_code == 1 and "unknown --backend 'tpu'; choose one of: torch, jax" in bad.output
    monkeypatch.setitem(sys.modules, "mlx_jax.generation", None)  # as if not installed
    missing = invoke("chat", "-m", str(tiny_model_dir), "--backend", "jax", input="hi\n")
    assert missing.exit_code == 1
    assert "--backend jax needs mlx-jax" in missing.output
    assert "pip install mlx-jax" in missing.output and "Traceback" not in missing.output


def test_generate_jax_needs_no_torch(tiny_model_dir):
    expected = invoke("generate", "-m", str(tiny_model_dir), "-p", "hello", "-n", "5", "--no-chat")
    code = ("import sys; sys.modules['torch'] = None\nfrom mlx_core.cli.app import main\n"
            "sys.argv = ['mlx', *sys.argv[1:]]\nmain()\n")
    done = subprocess.run([sys.executable, "-c", code, "generate", "-m", str(tiny_model_dir), "-p",
                           "hello", "-n", "5", "--no-chat", "--backend", "jax"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected.output
