"""Crash-safe file replacement: a reader sees the old file or the new one, never a torn one.

The temp file lives in the target's directory so ``os.replace`` is a same-filesystem rename
(atomic); the file is fsynced before the rename and the directory after it, so the new name
survives a power loss, not only a process kill.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"


def temp_name(path: Path) -> Path:
    """A fresh hidden sibling of ``path``: ``.<name>.<pid>.<random>.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write; on a clean exit it replaces ``path`` durably.

    On an exception the temp file is removed and ``path`` is left as it was. The temp file
    is not pre-created, so the writer creates it with the usual permissions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        commit_temp(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def commit_temp(tmp: Path, path: Path) -> None:
    """Make a finished temp file ``path``: fsync it, rename it over ``path``, fsync the
    directory. For writers that keep a temp file open across calls (see ``atomic_path``)."""
    _fsync(tmp, os.O_RDONLY)
    os.replace(tmp, path)
    _fsync(path.parent, os.O_RDONLY | os.O_DIRECTORY)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(body: dict[str, Any]) -> bytes:
    """``body`` as JSON with a checksum, so a torn or edited file is detected, not trusted."""
    return json.dumps({"checksum": _digest(body), "state": body}, indent=1,
                      sort_keys=True).encode()


def unseal(data: bytes) -> dict[str, Any] | None:
    """The body ``seal`` wrote, or None when the checksum does not match."""
    try:
        doc = json.loads(data)
        body = doc["state"]
        return body if _digest(body) == doc["checksum"] else None
    except (ValueError, KeyError, TypeError):
        return None


def _digest(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()


def file_digest(path: Path) -> str:
    """blake2b of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
