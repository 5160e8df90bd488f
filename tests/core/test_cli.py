"""The `mlx` command line: help, models, convert, generate, chat, doctor, plugins, no-torch."""

import subprocess
import sys

import pytest
import torch
import typer
from typer.testing import CliRunner

from mlx_core import build_model, get_preset, registry, save_model
from mlx_core.cli.app import build_app

runner = CliRunner()


def invoke(*args, input=None):
    return runner.invoke(build_app(), list(args), input=input)


def test_help_lists_core_commands():
    out = invoke("--help").output
    for command in ("models", "generate", "chat", "doctor"):
        assert command in out


def test_plugin_commands_appear_in_help():
    plugin = typer.Typer(help="A plugin's command group.")

    @plugin.command()
    def hello():
        typer.echo("hello from the plugin")

    registry.cli_commands.register("fake-plugin", plugin)
    try:
        assert "fake-plugin" in invoke("--help").output
        done = invoke("fake-plugin", "hello")
        assert done.exit_code == 0 and "hello from the plugin" in done.output
    finally:
        registry.cli_commands._items.pop("fake-plugin")


def test_models_list_and_presets():
    done = invoke("models", "list")
    assert done.exit_code == 0 and "smollm2-135m-instruct" in done.output and "135M" in done.output
    presets = invoke("models", "list", "--presets")
    assert presets.exit_code == 0 and "tiny-mixtral" in presets.output


def test_models_info_preset_and_unknown_name():
    done = invoke("models", "info", "tiny-gpt2")
    assert done.exit_code == 0 and "learned" in done.output
    bad = invoke("models", "info", "smollm2-135")
    assert bad.exit_code == 1
    assert "Did you mean: smollm2-135m-instruct" in bad.output
    assert "Traceback" not in bad.output


@pytest.fixture
def tiny_dir(tmp_path):
    torch.manual_seed(0)
    return save_model(build_model(get_preset("tiny-llama")), tmp_path / "tiny")


def test_convert_hf_dir_and_refuse_to_overwrite(tiny_dir, tmp_path):
    done = invoke("models", "convert", str(tiny_dir), str(tmp_path / "out"))
    assert done.exit_code == 0, done.output
    assert (tmp_path / "out" / "model.safetensors").is_file()
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    again = invoke("models", "convert", str(tiny_dir), str(tmp_path / "out"))
    assert again.exit_code == 1 and "--overwrite" in again.output.replace("overwrite=True", "--overwrite")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    missing = invoke("models", "convert", str(tmp_path / "nope"), str(tmp_path / "x"))
    assert missing.exit_code == 1 and "nope" in missing.output
    assert not (tmp_path / "x").exists()


def test_doctor_reports_versions_and_kernels():
    done = invoke("doctor")
    assert done.exit_code == 0
    assert "torch" in done.output and "backend on cpu" in done.output


_NO_TORCH = "import sys; sys.modules['torch'] = None\nfrom mlx_core.cli.app import main\nsys.argv = ['mlx', *sys.argv[1:]]\nmain()\n"


def _mlx_without_torch(*args):
    return subprocess.run([sys.executable, "-c", _NO_TORCH, *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args", [["--help"], ["models", "list"], ["doctor"]])
def test_torch_free_commands_work_without_torch(args):
    done = _mlx_without_torch(*args)
    assert done.returncode == 0, done.stderr


def test_generate_without_torch_says_what_to_install():
    done = _mlx_without_torch("generate", "--prompt", "hi")
    assert done.returncode == 1
    assert "pip install 'mlx-core[torch]'" in done.stderr


@pytest.mark.builtin_model
def test_generate_streams_text(builtin_model_dir):
    done = invoke("generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "12")
    assert done.exit_code == 0, done.output
    assert "Paris" in done.output


@pytest.mark.builtin_model
def test_chat_with_piped_input(builtin_model_dir):
    done = invoke("chat", "--max-new-tokens", "8", input="Hello!\n/reset\nWhat is 2+2?\n/exit\n")
    assert done.exit_code == 0, done.output
    assert "(conversation cleared)" in done.output
    assert len(done.output.strip().splitlines()) >= 3
