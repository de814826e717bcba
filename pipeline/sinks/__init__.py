"""Sinks: where vectors go. The factory imports a backend only when a job uses it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from pipeline.job.config import SinkConfig
from pipeline.sinks.base import GenerationMark, Sink, VectorBatch

__all__ = ["Sink", "VectorBatch", "doc_id_limit", "make_sink", "target_name"]


def target_name(config: SinkConfig, alias: str, fingerprint: str, generation: int) -> str:
    """Where one generation is written.

    Milvus: one collection per fingerprint (``<alias>__<fp>``), updated in place by runs with
    the same settings, so a nightly sync touches only what changed. Parquet: one version
    directory per run, since Parquet files cannot be updated in place.
    """
    if config.kind == "parquet":
        return f"v{generation:05d}-{fingerprint}"
    return f"{alias}__{fingerprint}"


def doc_id_limit(config: SinkConfig) -> int | None:
    """The longest document id, in UTF-8 bytes, the destination stores (Milvus VARCHAR)."""
    if config.kind == "milvus":
        from pipeline.sinks.fields import MAX_DOC_ID_BYTES

        return MAX_DOC_ID_BYTES
    return None


def make_sink(config: SinkConfig, resolve: Callable[[str], Path], alias: str, target: str,
              base: str | None = None, file_metadata: Mapping[str, str] | None = None,
              mark: GenerationMark | None = None) -> Sink:
    """The configured sink writing generation ``target``, published as ``alias``.

    ``base`` is the published generation an incremental run builds on (None: a fresh build).
    ``file_metadata`` (model, fingerprint...) is written into every Parquet file; ``mark``
    into the generation when it is created.
    """
    if config.kind == "parquet":
        from pipeline.sinks.parquet import ParquetSink

        assert config.path is not None  # SinkConfig validates it
        root = resolve(config.path)
        return ParquetSink(root / target, rows_per_file=config.rows_per_file,
                           store_text=config.store_text, file_metadata=file_metadata, root=root,
                           base=root / base if base else None, file_prefix=f"{target[:6]}-",
                           mark=mark)

    from pipeline.sinks.milvus import MilvusSink, is_server_uri

    assert config.uri is not None  # SinkConfig validates it
    uri = config.uri if is_server_uri(config.uri) else str(resolve(config.uri))
    return MilvusSink(uri, target, token=config.resolved_token(), index=config.index,
                      store_text=config.store_text, alias=alias, mark=mark,
                      secure=bool(config.secure),
                      tls=config.tls.resolved(resolve) if config.tls else None)
