"""Reading small files that came from elsewhere (manifests, keys, registries): bounded, and
parsed as a JSON object, with the caller's error type so each module keeps its own."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path

ErrorFactory = Callable[[str], Exception]


def read_limited(path: Path, limit: int, error: ErrorFactory = ValueError, what: str = "file") -> bytes:
    """The bytes of the regular file ``path``; ``error(message)`` is raised when it is missing,
    not a regular file (a FIFO would block), or over ``limit`` bytes, without reading past
    ``limit + 1`` bytes."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{path}: {what} is not a regular file")
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise error(f"{path}: {what} is over the {limit}-byte limit")
    return data


def parse_json_object(path: Path, data: bytes, error: ErrorFactory = ValueError, what: str = "file") -> dict:
    """``data`` (read from ``path``) as a JSON object, or ``error(message)`` naming the file."""
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as problem:
        raise error(f"{path}: {what} is not valid JSON ({problem})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: {what} must be a JSON object")
    return value


def read_json_object(path: Path, limit: int, error: ErrorFactory = ValueError, what: str = "file") -> dict:
    return parse_json_object(path, read_limited(path, limit, error, what), error, what)
