"""What every reader shares: finding files, choosing columns, and turning one row into a Document.

Every reader hands its rows (plain mappings) here, so id, text and metadata rules and
the bad-row policy cannot drift apart between JSONL, Parquet and datasets sources.
"""

from __future__ import annotations

import datetime
import decimal
import fnmatch
import glob
import math
import os
import re
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.errors import InputError
from pipeline.job.sections import SourceConfig
from pipeline.records import DeadLetter, Document, content_hash

_MISSING = object()
_GLOB_CHARS = re.compile(r"[*?[]")
# File name endings a directory given as a path is searched for, to suggest a glob.
_SUFFIXES = (".jsonl", ".parquet", ".json", ".jsonl.gz", ".json.gz")
_NOT_REGULAR = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket",
                stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


class BadRow(Exception):
    """A row that cannot become a Document; ``reason`` is one line naming the field."""

    def __init__(self, reason: str, doc_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.doc_id = doc_id


def reject(source: SourceConfig, where: str, bad: BadRow,
           on_dead_letter: Callable[[DeadLetter], None]) -> None:
    """Apply ``on_bad_row``: stop with a one-line InputError, or record a dead letter."""
    if source.on_bad_row == "error":
        raise InputError(f"{where}: {bad.reason}")
    on_dead_letter(DeadLetter(doc_id=bad.doc_id, source=where, reason=bad.reason))


def row_to_document(row: Mapping[str, Any], where: str, source: SourceConfig,
                    on_dead_letter: Callable[[DeadLetter], None]) -> Document | None:
    """The row as a Document, or None after the bad-row policy has dealt with it."""
    try:
        return _build(row, where, source)
    except BadRow as bad:
        reject(source, where, bad, on_dead_letter)
        return None


def expand_paths(patterns: list[str], resolve: Callable[[str], Path],
                 suffixes: Sequence[str] = _SUFFIXES) -> list[Path]:
    """Regular files named by paths and globs, each glob sorted; a file named twice (through
    another path or a symlink too) is read once, where it was first named.

    A glob skips what it matches that is not a regular file (directories, FIFOs); a path must
    name a regular file. ``suffixes``: the file name endings a glob suggested for a directory
    given as a path may use.
    """
    files: dict[str, Path] = {}
    for pattern in patterns:
        resolved = resolve(pattern)
        if _GLOB_CHARS.search(pattern):
            found = sorted(_glob(str(resolved)))
            matches = [Path(p) for p in found if _is_regular_file(p)]
            if not matches:
                raise InputError(_no_regular_match(resolved, found, suffixes))
        else:
            _check_regular_file(resolved, suffixes)
            matches = [resolved]
        for path in matches:
            files.setdefault(os.path.realpath(path), path)
    return list(files.values())


def _is_regular_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _check_regular_file(path: Path, suffixes: Sequence[str]) -> None:
    """Raise the one-line InputError that says why ``path`` is not a regular file to read."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{path}: no such file" + (
            " (a broken symbolic link)" if path.is_symlink() else "")) from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{path}/ is a directory; use a glob such as "
                         f"{_directory_glob(path, suffixes)}")
    if not stat.S_ISREG(mode):
        raise InputError(f"{path}: not a regular file but {_kind(path)}; "
                         "source paths must name regular files")


def _no_regular_match(pattern: Path, found: list[str], suffixes: Sequence[str]) -> str:
    """Why a glob gave no file: it matched nothing, or only directories and special files."""
    if not found:
        return f"{pattern}: no such file"
    dirs = [p for p in found if os.path.isdir(p)]
    if len(dirs) == len(found):
        return (f"{pattern}: matches only directories ({len(dirs)}, e.g. {dirs[0]}); use a glob "
                f"such as {_directory_glob(pattern, suffixes, sample=Path(dirs[0]))}")
    other = next(p for p in found if not os.path.isdir(p))
    return f"{pattern}: matches no regular file ({other} is {_kind(Path(other))})"


def _kind(path: Path) -> str:
    """What a path that is not a regular file is, for a message."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if path.is_symlink() else "missing"
    except (OSError, ValueError) as e:
        return f"unreadable ({getattr(e, 'strerror', None) or e})"
    return "a directory" if stat.S_ISDIR(mode) else _NOT_REGULAR.get(stat.S_IFMT(mode),
                                                                      "a special file")


def _directory_glob(directory: Path, suffixes: Sequence[str], sample: Path | None = None) -> str:
    """A glob for the files in ``directory``: of the known type most of them have (the files
    of ``sample`` are counted when ``directory`` is itself a glob)."""
    counts: Counter[str] = Counter()
    subdirectories = False
    longest_first = sorted(suffixes, key=len, reverse=True)
    try:
        with os.scandir(sample or directory) as entries:
            for _, entry in zip(range(10_000), entries):
                name = entry.name.lower()
                suffix = next((s for s in longest_first if name.endswith(s)), None)
                if suffix is not None and entry.is_file():
                    counts[suffix] += 1
                subdirectories = subdirectories or entry.is_dir()
    except OSError:
        pass
    if counts:
        return f"{directory}{os.sep}*{counts.most_common(1)[0][0]}"
    preferred = [s for s in (".jsonl", ".parquet") if s in suffixes] or list(suffixes) or [""]
    return f"{directory}{os.sep}{'**' + os.sep if subdirectories else ''}*{preferred[0]}"


def _glob(pattern: str) -> list[str]:
    """``glob.glob(pattern, recursive=True)``, except that ``**`` never enters a directory it
    is already inside: glob follows a symlink loop (``data/up -> ..``) lap after lap, naming
    the same files ~40 times for one loop and without end for two."""
    if "**" not in pattern.split(os.sep):
        return glob.glob(pattern)
    head, *parts = pattern.split(os.sep)
    base = head or os.sep  # '' before the first separator: an absolute pattern
    if head and (head == "**" or glob.has_magic(head)):
        base, parts = "", [head, *parts]
    found: list[str] = []
    start = _dir_identity(base or os.curdir)
    if start is not None:
        _match(base, [p for p in parts if p], frozenset([start]), found)
    if pattern.endswith(os.sep):  # as glob: a trailing separator matches directories only
        found = [p for p in found if os.path.isdir(p)]
    return found


def _match(base: str, parts: list[str], inside: frozenset[tuple[int, int]],
           found: list[str]) -> None:
    """Add to ``found`` the paths under directory ``base`` that ``parts`` match; ``inside``
    holds the (device, inode) of ``base`` and of the directories ``**`` came through to it."""
    if not parts:
        if base:
            found.append(base)
        return
    part, rest = parts[0], parts[1:]
    if not (part == "**" or glob.has_magic(part)):
        path = os.path.join(base, part) if base else part
        if not rest:
            if os.path.lexists(path):
                found.append(path)
        elif (ident := _dir_identity(path)) is not None:
            _match(path, rest, frozenset([ident]), found)
        return
    if part == "**":
        _match(base, rest, inside, found)  # '**' also matches no directory at all
    try:
        with os.scandir(base or os.curdir) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(".") and not part.startswith("."):
            continue  # hidden, as glob has it
        if part != "**" and not fnmatch.fnmatch(entry.name, part):
            continue
        path = os.path.join(base, entry.name) if base else entry.name
        ident = _entry_dir_identity(entry)
        if part == "**":
            if ident is None:
                if not rest:
                    found.append(path)
            elif ident not in inside:  # else: a symlink back up to where '**' came from
                _match(path, parts, inside | {ident}, found)
        elif not rest:
            found.append(path)
        elif ident is not None:
            _match(path, rest, frozenset([ident]), found)


def _dir_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def _entry_dir_identity(entry: os.DirEntry[str]) -> tuple[int, int] | None:
    try:
        if not entry.is_dir():
            return None
        st = entry.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def projection(source: SourceConfig, columns: Iterable[str], where: str) -> list[str]:
    """The columns worth reading; a missing text (or required id) column is a file-level error.

    Missing metadata columns are left out: their values become None, as in JSONL.
    """
    available = list(columns)
    required = [source.text_field]
    if source.id_fallback == "error":
        required.append(source.id_field)
    for name in required:
        if name not in available:
            raise InputError(f"{where}: column {name!r} not found; columns: {', '.join(available)}")
    wanted = [source.id_field, source.text_field, *source.metadata_fields]
    return [name for name in dict.fromkeys(wanted) if name in available]


def _build(row: Mapping[str, Any], where: str, source: SourceConfig) -> Document:
    raw_id = _plain(row.get(source.id_field, _MISSING))
    id_absent = _absence(raw_id)
    doc_id = None if id_absent else _id_string(raw_id, source.id_field)
    text = _text(_plain(row.get(source.text_field, _MISSING)), source.text_field, doc_id)
    if id_absent:
        if source.id_fallback != "content_hash":
            raise BadRow(f"field {source.id_field!r}: {id_absent}")
        doc_id = content_hash(text)
    metadata = {name: _metadata_value(row.get(name), name, doc_id)
                for name in source.metadata_fields}
    assert doc_id is not None  # an absent id became the content hash or a BadRow above
    return Document(doc_id=doc_id, text=text, source=where, metadata=metadata)


def _absence(value: Any) -> str | None:
    """Why a value counts as absent ('missing', 'null', 'empty'), or None if present."""
    if value is _MISSING:
        return "missing"
    if value is None:
        return "null"
    if isinstance(value, str) and not value.strip():
        return "empty"
    return None


def _id_string(value: Any, name: str) -> str:
    # bool is an int subclass, but True as an id is a data bug, not an id.
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadRow(f"field {name!r}: must be a string or an integer (got {type(value).__name__})")
    return str(value)


def _text(value: Any, name: str, doc_id: str | None) -> str:
    absent = _absence(value)
    if absent:
        raise BadRow(f"field {name!r}: {absent}", doc_id)
    if not isinstance(value, str):
        raise BadRow(f"field {name!r}: must be a string (got {type(value).__name__})", doc_id)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # JSON can spell lone surrogates (\ud800); no tokenizer or sink can store them.
        raise BadRow(f"field {name!r}: not valid Unicode (lone surrogate)", doc_id) from None
    return value


def _metadata_value(value: Any, name: str, doc_id: str | None) -> Any:
    try:
        return _jsonable(value)
    except TypeError as e:
        raise BadRow(f"field {name!r}: not JSON-serialisable ({e})", doc_id) from None


def _plain(value: Any) -> Any:
    """numpy and pyarrow scalars/arrays as the Python values they stand for."""
    if isinstance(value, pa.Scalar):
        return value.as_py()
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return value


def _jsonable(value: Any) -> Any:
    """A value that ``json.dumps`` accepts, since metadata is stored as JSON by the sinks."""
    value = _plain(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or Infinity: a missing value (pandas writes NaN for one)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value) if value.is_finite() else None  # exact, unlike float
    raise TypeError(type(value).__name__)
