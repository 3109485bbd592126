"""Path helpers shared by the actions."""

from __future__ import annotations

import os


def show(path: str | os.PathLike[str]) -> str:
    """A printable, JSON-safe form of a path whose bytes may not be UTF-8."""
    raw = os.fsencode(path)
    return raw.decode("utf-8", "backslashreplace")


def error(message: str, **fields: object) -> dict[str, object]:
    return {"error": message, **fields}


def describe(exc: OSError) -> str:
    return f"{type(exc).__name__}: {exc.strerror or exc}"
