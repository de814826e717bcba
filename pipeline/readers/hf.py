"""Hugging Face ``datasets`` sources: a hub name, a local data directory, or a ``save_to_disk`` copy."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeAlias

import datasets
import huggingface_hub
import huggingface_hub.constants
import pyarrow as pa
from datasets.exceptions import DatasetsError
from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

from pipeline.errors import InputError, one_line
from pipeline.job.sections import SourceConfig
from pipeline.readers.rows import expand_paths, projection, row_to_document
from pipeline.records import DeadLetter, Document

AnyDataset: TypeAlias = "datasets.Dataset | datasets.IterableDataset"

# "Bad split: x. Available splits: ['train']" / 'Unknown split "x". Should be one of [...]'
_SPLIT_LIST = re.compile(r"(?:Available splits:|Should be one of)\s*(\[[^\]]*\])")
# One request says whether the Hub can be reached, instead of datasets' retries (~30 s).
HUB_PROBE_TIMEOUT_S = 3.0
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}


def read_hf(source: SourceConfig, resolve: Callable[[str], Path],
            on_dead_letter: Callable[[DeadLetter], None]) -> Iterator[Document]:
    """Load (or open lazily, when streaming) now, so a bad name or split fails before any work.

    ``source`` of each Document is ``hf:<dataset>[<split>]#ROW`` (0-based).
    """
    label = f"hf:{source.dataset}"
    ds = _load(source, resolve, label)
    columns = ds.column_names
    if columns is not None:  # a streamed dataset may not know its columns before reading
        ds = ds.select_columns(projection(source, columns, label))
    return _documents(ds, source, f"{label}[{source.split}]", on_dead_letter)


def _documents(ds: AnyDataset, source: SourceConfig, label: str,
               on_dead_letter: Callable[[DeadLetter], None]) -> Iterator[Document]:
    for index, row in enumerate(_rows(ds, label)):
        doc = row_to_document(row, f"{label}#{index}", source, on_dead_letter)
        if doc is not None:
            yield doc


def _rows(ds: AnyDataset, label: str) -> Iterator[dict[str, Any]]:
    """Rows one at a time (memory-mapped or streamed); a data file that breaks is terminal."""
    try:
        yield from ds
    except (DatasetsError, pa.ArrowException, ValueError) as e:
        raise InputError(f"{label}: {one_line(e)}") from None


def _load(source: SourceConfig, resolve: Callable[[str], Path], label: str) -> AnyDataset:
    assert source.dataset is not None  # SourceConfig requires it for kind hf
    local = resolve(source.dataset)
    if _is_saved_dataset(local):
        return _from_disk(local, source.split, label)
    data_files: str | list[str] | None = source.data_files
    if source.dataset in _PACKAGED_DATASETS_MODULES and data_files is not None:
        # A builder ('json', 'parquet') reads job-relative files, found here like any file
        # source; a local or hub dataset's data_files are patterns inside it, kept as written.
        patterns = [data_files] if isinstance(data_files, str) else data_files
        data_files = [str(p) for p in expand_paths(patterns, resolve)]
    on_hub = not local.exists() and _is_hub_name(str(source.dataset))
    offline = _offline()
    unreachable = _hub_unreachable() if on_hub and not offline else None
    try:
        # Offline (or with the Hub out of reach) datasets still finds a hub dataset it cached.
        with _hub_offline(offline or unreachable is not None):
            return datasets.load_dataset(
                str(local) if local.exists() else source.dataset, name=source.config,
                split=source.split, streaming=source.streaming, data_files=data_files)
    except ConnectionError as e:
        if not on_hub:
            raise InputError(f"{label}: {one_line(e)}") from None
        why = ("the Hugging Face Hub is not tried (HF_HUB_OFFLINE is set)" if offline else
               f"the Hugging Face Hub cannot be reached ({unreachable or one_line(e)})")
        raise InputError(
            f"{label}: not a local dataset ({local} does not exist) nor in the datasets cache, "
            f"and {why}; save it with save_to_disk and give that directory, or give its files "
            f"(dataset: json or parquet, data_files: ...)") from None
    except (DatasetsError, OSError, ValueError) as e:  # FileNotFoundError is an OSError
        raise InputError(_split_message(label, source.split, e) or f"{label}: {one_line(e)}") from None


def _is_hub_name(name: str) -> bool:
    """Whether datasets would look ``name`` up on the Hub: not a builder, not a path."""
    if name in _PACKAGED_DATASETS_MODULES or name.startswith((".", "~", os.sep)):
        return False
    return name.startswith(("hf://", "buckets/")) or ("://" not in name and name.count("/") <= 1)


def _offline() -> bool:
    """HF_HUB_OFFLINE (or its datasets/transformers twins) is set, now or when imported."""
    return (any(os.environ.get(v, "").upper() in _TRUE for v in _OFFLINE_VARIABLES)
            or datasets.config.HF_HUB_OFFLINE or huggingface_hub.constants.HF_HUB_OFFLINE)


@contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """datasets and huggingface_hub read HF_HUB_OFFLINE when imported: make them offline
    for this load when it was set later, or when the Hub is out of reach."""
    if not offline:
        yield
        return
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """None if the Hub answers one request (whatever the answer) within ``timeout`` seconds,
    else why not. Run in a thread so that a name lookup that hangs cannot hold it longer."""
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            huggingface_hub.get_session().head(datasets.config.HF_ENDPOINT, timeout=timeout)
            outcome.append(None)
        except Exception as e:  # noqa: BLE001 - any failure means: not reachable
            outcome.append(one_line(e) or type(e).__name__)

    thread = threading.Thread(target=probe, name="hf-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def _is_saved_dataset(path: Path) -> bool:
    return (path / datasets.config.DATASETDICT_JSON_FILENAME).is_file() or (
        path / datasets.config.DATASET_STATE_JSON_FILENAME).is_file()


def _from_disk(path: Path, split: str, label: str) -> datasets.Dataset:
    """A ``save_to_disk`` copy; a DatasetDict gives up the configured split."""
    saved = datasets.load_from_disk(str(path))
    if isinstance(saved, datasets.Dataset):
        return saved
    if split not in saved:
        raise InputError(f"{label}: split {split!r} not found; available: {', '.join(saved)}")
    return saved[split]


def _split_message(label: str, split: str, error: Exception) -> str | None:
    """datasets' bad-split errors in this module's one-line shape, or None if not one."""
    match = _SPLIT_LIST.search(str(error)) if isinstance(error, ValueError) else None
    if match is None:
        return None
    available = re.findall(r"'([^']*)'", match.group(1))
    return f"{label}: split {split!r} not found; available: {', '.join(available)}"
