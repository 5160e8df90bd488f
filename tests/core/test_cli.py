"""The `mlx` command line: help, models, convert, generate, chat, doctor, plugins, no-torch."""

import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from mlx_core import registry
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
    qwen3 = invoke("models", "info", "qwen3-0.6b")  # 28 layers x 8 kv heads x 128 x k+v x 2 bytes
    assert qwen3.exit_code == 0 and "114,688 bytes bf16" in qwen3.output
    assert "train, tune, serve (torch); jax (mlx-jax)" in qwen3.output
    moe = invoke("models", "info", "qwen3-30b-a3b")  # 48 layers x 4 kv heads x 128 x k+v x 2 bytes
    assert moe.exit_code == 0 and "qwen3_moe" in moe.output and "98,304 bytes bf16" in moe.output
    assert "30,532,122,624" in moe.output and "3,353,032,704" in moe.output  # 8 of 128 experts
    bad = invoke("models", "info", "smollm2-135")
    assert bad.exit_code == 1
    assert "Did you mean: smollm2-135m-instruct" in bad.output
    assert "Traceback" not in bad.output


def test_models_info_directory_and_missing_path(tiny_model_dir, tmp_path):
    done = invoke("models", "info", str(tiny_model_dir))
    assert done.exit_code == 0 and "directory" in done.output and "78K" in done.output
    missing = invoke("models", "info", str(tmp_path / "nope"))
    assert missing.exit_code == 1 and "nope does not exist" in missing.output


def test_convert_hf_dir_and_refuse_to_overwrite(tiny_model_dir, tmp_path):
    done = invoke("models", "convert", str(tiny_model_dir), str(tmp_path / "out"))
    assert done.exit_code == 0, done.output
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    again = invoke("models", "convert", str(tiny_model_dir), str(tmp_path / "out"))
    assert again.exit_code == 1 and "pass --overwrite" in again.output
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    forced = invoke("models", "convert", str(tiny_model_dir), str(tmp_path / "out"), "--overwrite")
    assert forced.exit_code == 0, forced.output
    missing = invoke("models", "convert", str(tmp_path / "nope"), str(tmp_path / "x"))
    assert missing.exit_code == 1 and "nope" in missing.output
    assert not (tmp_path / "x").exists()
    not_a_model = invoke("models", "convert", str(tmp_path), str(tmp_path / "x"))
    assert not_a_model.exit_code == 1 and "neither a .gguf file" in not_a_model.output
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))


@pytest.mark.parametrize("chat", ["--chat", "--no-chat"])
def test_generate_streams_what_generate_returns(tiny_model_dir, chat):
    from mlx_core import generate, load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    prompt = (tokenizer.apply_chat_template([{"role": "user", "content": "hello there"}])
              if chat == "--chat" else tokenizer.encode("hello there"))
    ids = generate(load_model(tiny_model_dir), prompt, max_new_tokens=6,
                   stop_token_ids=tokenizer.eos_token_ids)
    done = invoke("generate", "-m", str(tiny_model_dir), "-p", "hello there", "-n", "6", chat)
    assert done.exit_code == 0, done.output
    assert done.output == tokenizer.decode(ids) + "\n"


def test_generate_unknown_model_and_missing_path(tmp_path):
    bad = invoke("generate", "-m", "smollm2", "-p", "hi")
    assert bad.exit_code == 1 and "Did you mean: smollm2-135m-instruct" in bad.output
    missing = invoke("generate", "-m", str(tmp_path / "gone.gguf"), "-p", "hi")
    assert missing.exit_code == 1 and "gone.gguf" in missing.output


def test_chat_keeps_history_resets_and_survives_ctrl_c(tiny_model_dir, monkeypatch):
    from mlx_core.models import generation

    real, prompts = generation.stream_generate, []

    def spy(model, prompt_ids, **options):
        prompts.append(list(prompt_ids))
        if len(prompts) == 2:
            raise KeyboardInterrupt
        yield from real(model, prompt_ids, **options)

    monkeypatch.setattr(generation, "stream_generate", spy)
    done = invoke("chat", "-m", str(tiny_model_dir), "--system", "be brief", "-n", "4",
                  input="hi\nhi hi\nhello there\n/reset\nhi\n/exit\nhello\n")
    assert done.exit_code == 0, done.output
    assert "(interrupted)" in done.output and "(conversation cleared)" in done.output
    assert len(prompts) == 4  # nothing after /exit
    first, interrupted, third, after_reset = prompts
    assert first == [1, 5, 9, 10, 2, 1, 3, 6, 2, 1, 4]  # system turn, user turn, assistant cue
    assert third[:len(first)] == first and len(third) > len(first) + 7  # the first turn is kept
    assert interrupted[-7:] == [1, 3, 6, 6, 2, 1, 4] and third[-7:] == [1, 3, 7, 8, 2, 1, 4]
    assert interrupted[:-7] == third[:-7]  # the interrupted turn is forgotten
    assert after_reset == first


def test_doctor_reports_versions_and_kernels():
    done = invoke("doctor")
    assert done.exit_code == 0
    assert "torch" in done.output and "backend on cpu" in done.output


_NO_TORCH = "import sys; sys.modules['torch'] = None\nfrom mlx_core.cli.app import main\nsys.argv = ['mlx', *sys.argv[1:]]\nmain()\n"


def _mlx_without_torch(*args):
    return subprocess.run([sys.executable, "-c", _NO_TORCH, *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["models", "list"],
                                  ["models", "info", "smollm2-135m-instruct"], ["doctor"]])
def test_torch_free_commands_work_without_torch(args):
    done = _mlx_without_torch(*args)
    assert done.returncode == 0, done.stderr


def test_every_plugin_registers_without_importing_torch():
    """`mlx --help` and every command start by loading all plugins: none of them imports torch
    (or torch._dynamo) then, which took `mlx --help` from 0.9 s to 7-8 s here."""
    script = ("import sys\nfrom mlx_core.cli.app import build_app\nfrom mlx_core import plugins\n"
              "build_app()\nassert not plugins.failed, plugins.failed\n"
              "print(sorted(m for m in ('torch', 'torch._dynamo', 'jax') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_convert_works_without_torch(tiny_model_dir, tmp_path):
    done = _mlx_without_torch("models", "convert", str(tiny_model_dir), str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "config.json").is_file()


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
