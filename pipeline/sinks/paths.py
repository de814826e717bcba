"""Whether a local directory can be (or be made): checked before anything is created, by the
sinks that write on this machine and by ``validate`` for the checkpoint directory."""

from __future__ import annotations

from pathlib import Path


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (the root always does)."""
    return next(p for p in (path, *path.parents) if p.exists())


def blocked(path: Path, existing: Path) -> str:
    """Why ``path`` cannot be a directory: it, or the ancestor ``existing``, is a file."""
    if existing == path:
        return f"{path} is a file, not a directory"
    return f"{existing} is a file, so {path} cannot be created"
