"""Makes a plain ``lm_eval --model mlx`` (and ``--model mlx-serve``) work once mlx-train is
installed: the one line of ``mlx_train_lm_eval.pth``, which the wheel puts in site-packages,
imports this module at interpreter start-up.

Why a start-up hook: lm-eval 0.4 (to 0.4.13 at least) finds models only in its own list; it
reads no plugin entry points, and its command line resolves ``--model`` before any user code
runs. So this module adds one finder to ``sys.meta_path`` that waits for ``lm_eval.models``
(the module whose import fills the harness's model registry) and, right after it has run, adds
our two model names to that registry as lazy ``module:class`` paths
(``mlx_train.lm_eval.register``). Nothing else is imported at start-up, and nothing happens in
a process that never imports lm_eval. ``MLX_LM_EVAL_REGISTER=0`` turns the hook off.
"""

from __future__ import annotations

import os
import sys

WATCHED = "lm_eval.models"


class _RegisterAfterExec:
    """Wraps the loader of ``lm_eval.models``: runs it, then registers ours."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):  # is_package, get_resource_reader, ... as the real loader
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            from mlx_train.lm_eval import register
        except ImportError:  # mlx-train half-removed: leave lm_eval as it is
            return
        register()


class LmEvalModelsFinder:
    """A meta-path finder for ``lm_eval.models`` only: asks the other finders for its spec and
    wraps the loader (once; it leaves ``sys.meta_path`` when it has found the module)."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != WATCHED:
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if f is not cls]
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisterAfterExec(spec.loader)
                return spec
        return None


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (idempotent; off with MLX_LM_EVAL_REGISTER=0).
    Where lm_eval.models is imported already, register at once."""
    if os.environ.get("MLX_LM_EVAL_REGISTER", "1") == "0":
        return
    if WATCHED in sys.modules:
        from mlx_train.lm_eval import register

        register()
    elif LmEvalModelsFinder not in sys.meta_path:
        sys.meta_path.insert(0, LmEvalModelsFinder)


install()
