"""Sinks: where vectors go. The factory imports a backend only when a job uses it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from pipeline.config import SinkConfig
from pipeline.sinks.base import Sink, VectorBatch

__all__ = ["Sink", "VectorBatch", "make_sink"]


def make_sink(config: SinkConfig, resolve: Callable[[str], Path], collection: str,
              file_metadata: Mapping[str, str] | None = None) -> Sink:
    """The configured sink. ``resolve`` makes job-file paths absolute; ``file_metadata``
    (model, fingerprint...) is written into every Parquet file."""
    if config.kind == "parquet":
        from pipeline.sinks.parquet import ParquetSink

        assert config.path is not None  # SinkConfig validates it
        return ParquetSink(resolve(config.path), rows_per_file=config.rows_per_file,
                           store_text=config.store_text, file_metadata=file_metadata)

    from pipeline.sinks.milvus import MilvusSink, is_server_uri

    assert config.uri is not None  # SinkConfig validates it
    uri = config.uri if is_server_uri(config.uri) else str(resolve(config.uri))
    return MilvusSink(uri, collection, token=config.token, index=config.index,
                      store_text=config.store_text)
