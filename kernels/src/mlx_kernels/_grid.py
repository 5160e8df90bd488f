"""Small launch helpers shared by the Triton launchers."""

from __future__ import annotations


def next_power_of_2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()
