"""Where mlx keeps pulled and converted models, and how it writes there without half-files."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def mlx_home() -> Path:
    """``$MLX_HOME``, default ``~/.cache/mlx``."""
    return Path(os.environ.get("MLX_HOME") or Path.home() / ".cache" / "mlx").expanduser()


def models_dir() -> Path:
    return mlx_home() / "models"


def downloads_dir() -> Path:
    return mlx_home() / "downloads"


@contextlib.contextmanager
def cache_lock(target: str | Path) -> Iterator[None]:
    """Hold an exclusive lock for the cache entry ``target`` while the block runs.

    Processes that fill the same entry at once (DDP ranks, server replicas, parallel test
    workers on a fresh machine) then take turns: the first fetches and converts, the later ones
    find the entry made (check again inside the block). The lock file lies in
    ``$MLX_HOME/locks``, not beside the entry, and stays there: removing it would race.
    """
    target = Path(target).expanduser().resolve()
    digest = hashlib.sha256(str(target).encode()).hexdigest()[:12]
    path = mlx_home() / "locks" / f"{target.name}-{digest}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        yield


@contextlib.contextmanager
def atomic_directory(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``target`` to fill; rename it into place only on success.

    A failure (or Ctrl-C) removes the temporary directory, so ``target`` is either absent or
    complete, never half-written.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; remove it or pass overwrite=True")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "wb") -> Iterator:
    """Open a temporary sibling of ``target`` for writing; replace ``target`` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
