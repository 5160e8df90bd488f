"""Process memory settings for CPU training.

glibc serves large blocks from its heap once its dynamic mmap threshold has grown, and keeps
freed heap memory: activations of a training step then pile up as fragmented, resident memory.
Measured on the built-in model (LoRA, 4x512 tokens, one forward+backward): peak RSS 5.3 GB with
glibc's default, 3.2 GB with a fixed 1 MiB threshold, after which memory also returns to the
system between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc malloc.h)


def release_large_blocks_eagerly(threshold_bytes: int = 1 << 20) -> bool:
    """Serve allocations of at least ``threshold_bytes`` with mmap (returned on free) and stop
    glibc from raising that threshold. Linux/glibc only; returns whether it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
