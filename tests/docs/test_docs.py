"""The docs are executable: every ```python and ```console block in docs/ and the package
READMEs runs here.

- ```python blocks of one file run in order in one namespace (later blocks use earlier names).
- ```console blocks: each ``$ command`` line runs in a shell and must exit 0.
- ```bash and ```text blocks are shown, not run (install commands, sample output).
Files that use the real built-in model are marked ``builtin_model``.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("packages/*/README.md"),
               ROOT / "kernels" / "README.md"])
_BLOCK = re.compile(r"^```(python|console)\n(.*?)^```", re.S | re.M)


def _blocks(path: Path) -> list[tuple[str, str]]:
    return _BLOCK.findall(path.read_text())


def _marks(path: Path):
    text = path.read_text()
    uses_builtin = "smollm2-135m-instruct" in text or "mlx generate" in text or "mlx chat" in text
    return [pytest.mark.builtin_model, pytest.mark.slow] if uses_builtin else []


@pytest.mark.parametrize(
    "path", [pytest.param(p, id=str(p.relative_to(ROOT)), marks=_marks(p)) for p in DOCS]
)
def test_doc_examples_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # python examples write their files into a scratch directory
    saved_environ = dict(os.environ)  # examples may set variables such as MLX_KERNELS
    namespace: dict = {"__name__": "__docs__"}
    try:
        for kind, body in _blocks(path):
            if kind == "python":
                exec(compile(body, f"{path.name}:python-block", "exec"), namespace)
                continue
            for line in body.splitlines():
                if line.startswith("$ "):  # shell examples run from the repository root
                    done = subprocess.run(line[2:], shell=True, capture_output=True, text=True,
                                          timeout=600, cwd=ROOT)
                    assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
    finally:
        os.environ.clear()
        os.environ.update(saved_environ)


def test_every_doc_has_an_example():
    missing = [str(p.relative_to(ROOT)) for p in DOCS if not _blocks(p)
               and "not implemented yet" not in p.read_text()]
    assert not missing, f"docs without a runnable example: {missing}"
