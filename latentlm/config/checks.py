"""Checks every config section shares."""

from __future__ import annotations

from typing import Any

__all__ = ["one_of"]


def one_of(where: str, value: Any, allowed) -> None:
    """``value`` must be one of ``allowed``; the error names the key ``where`` and the choices."""
    if value not in allowed:
        raise ValueError(f"{where}={value!r}: use one of {list(allowed)}.")
