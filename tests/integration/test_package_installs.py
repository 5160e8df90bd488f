"""Every package edge declared and tested.

Install tests (slow): each package installed as a user would, from its folder with the
dependencies its pyproject declares and nothing else, in a fresh venv: mlx-core alone (no
torch), mlx-kernels alone, mlx-adapters, mlx-train, mlx-serve (no mlx-adapters) and mlx-jax (no
torch); each runs its `mlx` help and one real call. The venvs are made by uv, given pip's index
settings (`pip config list`: its files and PIP_* variables), so it installs what pip would; its
cache hard-links the wheels into each venv, so only the first venv pays for unpacking torch.
Torch is pinned to the one running these tests (the CPU build this machine has on disk).

Static checks over the sources (fast): every import of a sibling package is declared by the
importer (a dependency or an extra), none names a sibling's private module or name, and the
packages import each other without a circle.
"""

import ast
import functools
import graphlib
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
import urllib.request
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.serve.process import running_mlx_serve

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"mlx_kernels": "kernels", "mlx_core": "packages/core",
           "mlx_adapters": "packages/adapters", "mlx_train": "packages/train",
           "mlx_serve": "packages/serve", "mlx_jax": "packages/jax_backend"}
DISTRIBUTIONS = {name: name.replace("_", "-") for name in FOLDERS}


def package(name: str, extras: str = "") -> str:
    """The install argument of one of ours: its folder, with ``extras`` (e.g. ``"[torch]"``)."""
    return f"{ROOT / FOLDERS[name]}{extras}"


# uv installs without byte-compiling: the first process in a venv writes the bytecode of what it
# imports (torch & co.), and the next ones reuse it, whatever PYTHONDONTWRITEBYTECODE says here
ENV = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}


def run(*cmd, timeout=600, env=None):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          env=env or ENV)


@functools.cache
def uv_settings() -> tuple[tuple[str, ...], dict]:
    """pip's index settings as uv options, and the environment uv runs in (pip's certificates).
    Sections rank as pip ranks them: ``global`` < ``install`` < the PIP_* variables."""
    listed = run(sys.executable, "-m", "pip", "config", "list")
    assert listed.returncode == 0, listed.stderr
    rank = {"global": 0, "install": 1, ":env:": 2}
    found: dict[str, tuple[int, str]] = {}
    for line in listed.stdout.splitlines():
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if section in rank and rank[section] >= found.get(name, (-1, ""))[0]:
            found[name] = (rank[section], ast.literal_eval(value))
    values = {name: value.split() for name, (_, value) in found.items()}
    # pip takes the best version on any index; uv's default would stop at the first index
    options = ["--index-strategy", "unsafe-best-match"]
    for name in ("index-url", "extra-index-url", "find-links", "constraint"):
        for value in values.get(name, []):
            options += [f"--{name}", value]
    if values.get("no-index", ["false"])[0].lower() in ("1", "true", "yes", "on"):
        options.append("--no-index")
    env = dict(ENV)
    if values.get("cert"):
        env.setdefault("SSL_CERT_FILE", values["cert"][0])
    return tuple(options), env


def fresh_venv(env_dir: Path, *requirements, torch: bool) -> Path:
    """A new venv (no system site-packages) with ``requirements`` (install arguments: our
    folders) and their declared dependencies; returns its python. ``torch``: whether the
    dependencies bring torch (then the version running these tests) or must not."""
    options, env = uv_settings()
    uv = (sys.executable, "-m", "uv")
    made = run(*uv, "venv", "--quiet", "--python", sys.executable, env_dir, env=env)
    assert made.returncode == 0, made.stderr
    python = env_dir / "bin" / "python"
    pin = env_dir / "torch-pin.txt"
    pin.write_text(f"torch=={version('torch')}\n" if torch else "")
    done = run(*uv, "pip", "install", "--quiet", "--python", python, *options, "--constraint", pin,
               *requirements, env=env)
    assert done.returncode == 0, done.stderr
    has_torch = run(python, "-c", "import torch").returncode == 0
    assert has_torch == torch, "torch must be installed" if torch else "torch must not be installed"
    return python


def installed(python: Path) -> set[str]:
    """Which of our packages import in the venv of ``python``."""
    code = f"import importlib.util as u; print(*[n for n in {list(FOLDERS)} if u.find_spec(n)])"
    return set(run(python, "-c", code).stdout.split())


def mlx_help(python: Path, *command) -> str:
    """``mlx [command] --help`` in the venv of ``python``: its output (it must succeed)."""
    done = run(python.parent / "mlx", *command, "--help")
    assert done.returncode == 0, done.stderr
    return done.stdout


def commands(help_text: str) -> set[str]:
    """The command names a typer help page lists in its boxes."""
    return set(re.findall(r"^│ (\w[\w-]*)\s", help_text, re.MULTILINE))


CORE_COMMANDS = {"models", "generate", "chat", "doctor", "bench"}


# -- install tests -------------------------------------------------------------------------


@pytest.mark.slow
def test_core_installs_and_runs_without_torch(tmp_path):
    python = fresh_venv(tmp_path / "venv", package("mlx_core"), torch=False)
    assert installed(python) == {"mlx_core"}
    assert commands(mlx_help(python)) == CORE_COMMANDS  # no sibling's commands
    mlx = python.parent / "mlx"
    listed = run(mlx, "models", "list")
    assert listed.returncode == 0, listed.stderr
    assert "smollm2-135m-instruct" in listed.stdout
    needs_torch = run(mlx, "generate", "--prompt", "hi")
    assert needs_torch.returncode == 1
    assert "mlx-core[torch]" in needs_torch.stdout + needs_torch.stderr
    imported = run(python, "-c", "import mlx_core; print(mlx_core.get_preset('tiny-llama').num_layers)")
    assert imported.stdout.strip() == "2", imported.stderr


@pytest.mark.slow
def test_kernels_install_alone_and_run_an_op_on_torch(tmp_path):
    """mlx-kernels[torch] alone: its rms_norm (the torch path and the Triton kernel under the
    interpreter) equals the formula, forward and gradient; its plugin is declared but needs
    mlx-core, and with mlx-core added `mlx bench kernels` runs."""
    python = fresh_venv(tmp_path / "venv", package("mlx_kernels", "[torch]"), torch=True)
    assert installed(python) == {"mlx_kernels"} and not (python.parent / "mlx").exists()
    code = textwrap.dedent("""
        import json, os, sys
        os.environ["TRITON_INTERPRET"] = "1"  # before triton loads: its kernels run on CPU
        from importlib.metadata import entry_points
        import torch
        import mlx_kernels

        torch.manual_seed(0)
        x, w = torch.randn(3, 5, 40, requires_grad=True), torch.randn(40, requires_grad=True)
        expected = w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        grads = torch.autograd.grad(expected.square().sum(), (x, w))
        errors = {}
        for backend in ("torch", "triton"):
            os.environ["MLX_KERNELS"] = backend  # read at each call
            y = mlx_kernels.rms_norm(x, w, 1e-6)
            got = torch.autograd.grad(y.square().sum(), (x, w))
            errors[backend] = max(float((a - b).abs().max())
                                  for a, b in zip((y, *got), (expected, *grads)))
        print(json.dumps({"errors": errors, "plugins": [e.name for e in entry_points(group="mlx.plugins")],
                          "core_loaded": "mlx_core" in sys.modules}))
    """)
    done = run(python, "-c", code)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["errors"]["torch"] < 1e-5 and out["errors"]["triton"] < 1e-4, out["errors"]
    assert out["plugins"] == ["kernels"] and out["core_loaded"] is False

    options, env = uv_settings()  # the plugin's command, once mlx-core provides `mlx`
    added = run(sys.executable, "-m", "uv", "pip", "install", "--quiet", "--python", python,
                *options, package("mlx_core"), env=env)
    assert added.returncode == 0, added.stderr
    assert "kernels" in commands(mlx_help(python, "bench"))
    bench = run(python.parent / "mlx", "bench", "kernels", "--ops", "rms_norm", "--quick",
                "--repeats", "1", "--no-memory")
    assert bench.returncode == 0, bench.stderr
    assert "rms_norm" in bench.stdout and "speedup_vs_torch" in bench.stdout


@pytest.mark.slow
def test_adapters_install_and_wrap_a_tiny_model_in_lora(tmp_path):
    """mlx-adapters with its dependencies (mlx-core[torch], mlx-kernels[torch]): `mlx adapters`
    is listed, a tiny Llama wrapped in LoRA trains only its adapter, and `mlx adapters inspect`
    reads the saved PEFT directory."""
    python = fresh_venv(tmp_path / "venv", package("mlx_core", "[torch]"),
                        package("mlx_kernels", "[torch]"), package("mlx_adapters"), torch=True)
    assert installed(python) == {"mlx_core", "mlx_kernels", "mlx_adapters"}
    assert {"methods", "inspect", "merge"} <= commands(mlx_help(python, "adapters"))
    saved = tmp_path / "adapter"
    code = textwrap.dedent(f"""
        import json
        import torch
        from mlx_adapters import LoraConfig, get_peft_model
        from mlx_core import build_model, get_preset

        torch.manual_seed(0)
        model = get_peft_model(build_model(get_preset("tiny-llama")),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        ids = torch.randint(0, 128, (2, 9))
        model(ids, labels=ids).backward()
        trained = sorted({{n.split(".")[-3] for n, p in model.named_parameters() if p.requires_grad}})
        with_grad = all(p.grad is not None for p in model.parameters() if p.requires_grad)
        model.save_pretrained({str(saved)!r})
        print(json.dumps({{"trained": trained, "with_grad": with_grad}}))
    """)
    done = run(python, "-c", code)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"trained": ["lora_A", "lora_B"],
                                                        "with_grad": True}
    inspected = run(python.parent / "mlx", "adapters", "inspect", saved)
    assert inspected.returncode == 0, inspected.stderr
    assert "LORA" in inspected.stdout and "q_proj" in inspected.stdout


@pytest.mark.slow
def test_train_installs_and_runs_a_recipe(tmp_path, tiny_model_dir):
    """mlx-train with its dependencies: its commands are listed, its lm_eval start-up hook runs,
    and `mlx train lora_finetune` (the recipe's YAML from the installed package) fine-tunes a
    tiny model and saves an adapter."""
    python = fresh_venv(tmp_path / "venv", package("mlx_core", "[torch]"),
                        package("mlx_kernels", "[torch]"), package("mlx_adapters"),
                        package("mlx_train"), torch=True)
    assert installed(python) == {"mlx_core", "mlx_kernels", "mlx_adapters", "mlx_train"}
    assert "mlx recipes list" in mlx_help(python, "train")
    # the wheel's mlx_train_lm_eval.pth (the `lm_eval --model mlx` hook) runs at start-up
    started = run(python, "-c", "import sys; print('_mlx_train_lm_eval' in sys.modules)")
    assert started.stdout.strip() == "True", started.stderr
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"w{a} w{a + 1}", "output": f"w{a + 1} w{a}"})
                            + "\n" for a in range(20, 52)))
    run_dir = tmp_path / "run"
    done = run(python.parent / "mlx", "train", "lora_finetune", "model=pretrained",
               f"model.source={tiny_model_dir}", "data=instruct", f"data.train_files={data}",
               "data.bs=16", "epochs=1", "eval.max_new_tokens=4", "eval.samples=0",
               "train.progress=false", f"output_dir={run_dir}")
    assert done.returncode == 0, done.stdout + done.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["valid_loss"] > 0
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"


@pytest.fixture
def lora_adapter(tmp_path, tiny_model_dir):
    """A PEFT LoRA directory for ``tiny_model_dir`` (made here, with mlx-adapters)."""
    import torch

    from mlx_adapters import LoraConfig, get_peft_model
    from mlx_core import load_model

    torch.manual_seed(0)
    tuned = get_peft_model(load_model(tiny_model_dir), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    tuned.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.mark.slow
def test_serve_installs_alone_and_serves_a_lora_adapter(tmp_path, tiny_model_dir, lora_adapter):
    """mlx-serve with its dependencies and no mlx-adapters: `mlx serve MODEL --lora NAME=DIR`
    answers completions for the base model and the adapter over HTTP, and stops on Ctrl-C."""
    python = fresh_venv(tmp_path / "venv", package("mlx_core", "[torch]"),
                        package("mlx_kernels", "[torch]"), package("mlx_serve"), torch=True)
    assert installed(python) == {"mlx_core", "mlx_kernels", "mlx_serve"}
    assert "--lora" in mlx_help(python, "serve")
    server = running_mlx_serve(python.parent / "mlx", [
        "--model", tiny_model_dir, "--lora", f"tuned={lora_adapter}", "--kv-cache-memory", "64MiB",
        "--no-ui", "--log-level", "warning"], tmp_path / "serve.log", env=ENV)
    with server as url:
        with urllib.request.urlopen(url + "/v1/models", timeout=30) as response:
            served = {m["id"] for m in json.load(response)["data"]}
        assert "tuned" in served and len(served) == 2, served
        for model in sorted(served):
            request = urllib.request.Request(
                url + "/v1/completions", headers={"Content-Type": "application/json"},
                data=json.dumps({"model": model, "prompt": "hi there", "max_tokens": 3,
                                 "temperature": 0, "ignore_eos": True}).encode())
            with urllib.request.urlopen(request, timeout=60) as response:
                answer = json.load(response)
            assert answer["model"] == model and answer["usage"]["completion_tokens"] == 3, answer


@pytest.mark.slow
def test_jax_side_installs_and_runs_without_torch(tmp_path):
    """mlx-jax's dependencies (mlx-core, mlx-kernels[jax], jax, flax, optax) resolve without
    torch, and ``mlx_kernels.jax`` and the Flax zoo (forward, loss, gradient, generation) run
    there, its ops coming from mlx_kernels.jax; the torch ops of ``mlx_kernels`` say what to
    install."""
    python = fresh_venv(tmp_path / "venv", package("mlx_core"), package("mlx_kernels", "[jax]"),
                        package("mlx_jax"), torch=False)
    assert installed(python) == {"mlx_core", "mlx_kernels", "mlx_jax"}
    assert {"jax", "kernels", "quant"} <= commands(mlx_help(python, "bench"))
    code = textwrap.dedent("""
        import json, sys
        import jax, jax.numpy as jnp, numpy as np
        from flax import nnx
        import mlx_kernels.jax as kj
        import mlx_jax
        from mlx_core import get_preset
        from mlx_jax import ops

        x = jnp.arange(24.0).reshape(2, 12)
        norm = jax.jit(kj.rms_norm)(x, jnp.ones(12))
        model = mlx_jax.build_model(get_preset("tiny-llama"))
        ids = np.array([[1, 2, 3, 4, 5]])
        logits = nnx.jit(lambda m, i: m(i))(model, ids)
        loss, grads = nnx.value_and_grad(lambda m: m(ids, labels=ids))(model)
        tokens = mlx_jax.generate(model, [1, 2, 3], max_new_tokens=3, stop_token_ids=[])
        try:
            from mlx_kernels import rms_norm  # noqa: F401  (the torch op)
            torch_op = "imported"
        except ImportError as e:
            torch_op = str(e)
        print(json.dumps({
            "torch_loaded": "torch" in sys.modules,
            "ops_from": {ops.rms_norm.__module__, ops.attention.__module__,
                         ops.fused_linear_cross_entropy.__module__}.pop(),
            "norm_rms": float(jnp.sqrt(jnp.mean(norm * norm, axis=-1)).min()),
            "logits": list(logits.shape), "loss": float(loss), "tokens": len(tokens),
            "finite_grads": all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads)),
            "torch_op": torch_op,
        }))
    """)
    done = run(python, "-c", code)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["torch_loaded"] is False
    assert out["ops_from"] == "mlx_kernels.jax"
    assert abs(out["norm_rms"] - 1.0) < 1e-3  # rows normalised to unit RMS
    assert out["logits"] == [1, 5, 128] and 0 < out["loss"] < 10 and out["finite_grads"]
    assert out["tokens"] == 3
    assert "pip install 'mlx-kernels[torch]'" in out["torch_op"]
    doctor = run(python.parent / "mlx", "doctor")  # reports kernels without torch, too
    assert doctor.returncode == 0, doctor.stderr
    assert "backend on cpu" in doctor.stdout


# -- static checks -------------------------------------------------------------------------


def project(name: str) -> dict:
    return tomllib.loads((ROOT / FOLDERS[name] / "pyproject.toml").read_text())["project"]


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def sibling_imports(name: str):
    """(file, line, imported module, imported names) for each import of another of our
    packages in ``name``'s sources, at any depth (inside functions too)."""
    for path in sorted((ROOT / FOLDERS[name] / "src" / name).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found = [(alias.name, []) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found = [(node.module, [alias.name for alias in node.names])]
            else:
                continue
            for module, names in found:
                if module.split(".")[0] in FOLDERS and module.split(".")[0] != name:
                    yield path.relative_to(ROOT), node.lineno, module, names


def is_plugin_host(path: Path, module: str) -> bool:
    """A package's ``plugin.py`` may use mlx-core: mlx-core's plugin loader is what runs it."""
    return path.name == "plugin.py" and module.split(".")[0] == "mlx_core"


def test_every_sibling_import_is_declared():
    undeclared = []
    for name in FOLDERS:
        meta = project(name)
        declared = {requirement_name(r) for r in meta.get("dependencies", [])}
        for extra in meta.get("optional-dependencies", {}).values():
            declared |= {requirement_name(r) for r in extra}
        for path, line, module, _ in sibling_imports(name):
            if DISTRIBUTIONS[module.split(".")[0]] not in declared and not is_plugin_host(path, module):
                undeclared.append(f"{path}:{line} imports {module}")
    assert undeclared == []


def test_no_package_imports_a_siblings_private_names():
    private = [f"{path}:{line} {module} {names}" for name in FOLDERS
               for path, line, module, names in sibling_imports(name)
               if any(part.startswith("_") and not part.startswith("__")
                      for part in module.split(".")[1:] + names)]
    assert private == []


def test_packages_import_each_other_without_circles():
    """Only a plugin's imports of mlx-core (its host) point back; the rest is a tree."""
    graph = {name: set() for name in FOLDERS}
    for name in FOLDERS:
        for path, _, module, _ in sibling_imports(name):
            if not is_plugin_host(path, module):
                graph[name].add(module.split(".")[0])
    order = list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError
    assert order.index("mlx_kernels") < order.index("mlx_core") < order.index("mlx_train")
    assert not any(path.name != "plugin.py"
                   for path, _, module, _ in sibling_imports("mlx_kernels"))


def test_dev_requirements_name_every_package():
    lines = (ROOT / "requirements-dev.txt").read_text().splitlines()
    editable = {line.split()[1].split("[")[0] for line in lines if line.startswith("-e ")}
    folders = {str(p.parent.relative_to(ROOT)) for p in ROOT.glob("**/pyproject.toml")
               if p.parent != ROOT and not any(part.startswith(".") for part in p.parts)}
    assert editable == folders == set(FOLDERS.values())


def test_torch_users_of_kernels_ask_for_its_torch_extra():
    """mlx-kernels has no base dependencies; what runs its torch ops must pull its [torch] extra
    (adapters, train and serve get it through mlx-core[torch]; adapters and serve, which call
    its ops themselves, name it too)."""
    base = project("mlx_kernels")["dependencies"]
    extras = project("mlx_kernels")["optional-dependencies"]
    assert base == [] and any(d.startswith("torch") for d in extras["torch"])
    assert "mlx-kernels[torch]" in project("mlx_core")["optional-dependencies"]["torch"]
    for name in ("mlx_adapters", "mlx_train", "mlx_serve"):
        assert "mlx-core[torch]" in project(name)["dependencies"], name
    for name in ("mlx_adapters", "mlx_serve"):
        assert "mlx-kernels[torch]" in project(name)["dependencies"], name
    assert "mlx-kernels[jax]" in project("mlx_jax")["dependencies"]
    train_extras = project("mlx_train")["optional-dependencies"]
    assert train_extras["jax"] == ["mlx-jax"] and train_extras["serve"] == ["mlx-serve"]
    assert "mlx-adapters" not in map(requirement_name, project("mlx_serve")["dependencies"])
