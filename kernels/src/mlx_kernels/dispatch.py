"""Which implementation runs: Triton kernels for CUDA tensors, torch references on CPU (where
fp32 paged attention, decode and short chunks over a cached prefix, has a native C kernel,
``_cpu_native``).

``MLX_KERNELS=auto|torch|triton`` (read at each call) overrides: ``torch`` always uses the
references; ``triton`` forces the kernels, on CPU too when ``TRITON_INTERPRET=1`` is set (that is
how the kernels are tested on machines without a GPU).

No torch import here: ``describe`` (``mlx doctor``) must work where only ``mlx_kernels.jax`` is
installed, and a device is told apart by its type name alone.
"""

from __future__ import annotations

import importlib.util
import os

from mlx_kernels import _cpu_native  # stdlib only: no torch import

CHOICES = ("auto", "torch", "triton")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def setting() -> str:
    choice = os.environ.get("MLX_KERNELS", "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"MLX_KERNELS={choice!r} is not valid; use one of {', '.join(CHOICES)}")
    return choice


def backend_for(device) -> str:
    """``"triton"`` or ``"torch"`` for tensors on ``device`` (a ``torch.device`` or its name,
    e.g. ``"cuda:1"``)."""
    device_type = device.split(":")[0] if isinstance(device, str) else device.type
    choice = setting()
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("MLX_KERNELS=triton but triton is not installed: pip install triton")
        if device_type != "cuda" and not interpreter_on():
            raise RuntimeError(
                f"MLX_KERNELS=triton with {device_type} tensors needs the Triton interpreter: "
                "set TRITON_INTERPRET=1, or use MLX_KERNELS=auto to run the torch reference"
            )
        return "triton"
    return "triton" if device_type == "cuda" and triton_available() else "torch"


def native_cpu(*tensors) -> bool:
    """Whether the native CPU kernels (``_cpu_native``) run on ``tensors``: fp32 on CPU, under
    ``MLX_KERNELS=auto``, with the kernels built, outside ``torch.compile`` (which cannot trace a
    raw pointer)."""
    import torch  # here, not at the top: this module must import without torch

    if torch.compiler.is_compiling() or setting() != "auto":
        return False
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return False
    return _cpu_native.library() is not None


def eager_inference() -> bool:
    """Inference mode, outside ``torch.compile``: where the native CPU kernels and the weight
    layouts made on first use may run. The compiler cannot trace raw pointers, nor ask about
    inference mode; under it the torch references run, and inductor fuses them."""
    import torch  # here, not at the top: this module must import without torch

    return not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()


def records_autograd(*tensors) -> bool:
    """Whether an op on ``tensors`` joins an autograd graph: grad mode is on and one of them
    requires grad. Where it does not, the torch paths skip their ``autograd.Function`` (whose
    Python bookkeeping costs more than a small inference op itself)."""
    import torch  # here, not at the top: this module must import without torch

    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def describe() -> dict:
    """What ``mlx doctor`` shows about kernels."""
    version = None
    if triton_available():
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        try:
            version = dist_version("triton")
        except PackageNotFoundError:
            version = "unknown"
    info = {
        "triton": version or "not installed",
        "TRITON_INTERPRET": interpreter_on(),
        "MLX_KERNELS": os.environ.get("MLX_KERNELS", "auto"),
    }
    found = _cpu_native.compiler()
    info["native CPU kernels"] = (f"built with {found} on first use" if found else
                                  "no C compiler: torch references on CPU")
    for device in ("cpu", "cuda"):
        try:
            info[f"backend on {device}"] = backend_for(device)
        except (RuntimeError, ValueError) as e:
            info[f"backend on {device}"] = f"error: {e}"
    return info
