"""Reading small files that came from elsewhere (manifests, keys, registries): bounded, and
parsed as a JSON object, with the caller's error type so each module keeps its own; and putting
a finished directory in place of another (:func:`replace_dir`)."""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from .safe_json import JSONRefused, parse_json

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
        value = parse_json(data)
    except JSONRefused as problem:
        raise error(f"{path}: {what} is not valid JSON ({problem})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: {what} must be a JSON object")
    return value


def read_json_object(path: Path, limit: int, error: ErrorFactory = ValueError, what: str = "file") -> dict:
    return parse_json_object(path, read_limited(path, limit, error, what), error, what)


def replace_dir(staging: Path, target: Path, keep: Callable[[Path], bool] | None = None) -> None:
    """Put the finished directory ``staging`` at ``target`` (a sibling on the same filesystem),
    replacing the directory there.

    The old directory is renamed aside and deleted afterwards, so ``target`` is never seen
    half-deleted or half-written. Installers of one target take turns (a POSIX lock on the
    parent directory), so several processes installing at once each succeed and the last one's
    copy stands. Where ``keep(target)`` says the directory already there will do (another
    process installed the same content first), ``staging`` is dropped instead.
    """
    staging, target = Path(staging), Path(target)
    aside = None
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if target.is_dir() and not target.is_symlink():
            if keep is not None and keep(target):
                shutil.rmtree(staging, ignore_errors=True)
                return
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, aside / target.name)
        try:
            os.replace(staging, target)  # a file or link at target: refused, nothing moved
        except OSError:
            if aside is not None:
                os.replace(aside / target.name, target)  # put the old one back
            raise
    finally:
        os.close(fd)  # releases the lock
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
