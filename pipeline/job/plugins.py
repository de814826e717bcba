"""The registry of plug-ins: each sink kind and embedder backend, by the name a job file gives it.

An entry names the plug-in's settings class (``"module:Class"``), a subclass of
``SinkSettings`` / ``ModelSettings`` that lives beside the plug-in and knows its facts (target
naming, context length, device rules) and how to build it, importing its heavy libraries
(pymilvus, torch, sglang) only then. A plug-in outside this package registers itself through
the ``embed_job.sinks`` / ``embed_job.backends`` entry-point groups; a new one needs no edit
of the product.
"""

from __future__ import annotations

import importlib
from functools import cache
from importlib.metadata import entry_points
from typing import Annotated, Any, Union

from pydantic import Discriminator, Field, Tag

from pipeline.job.sections import ModelSettings, SinkSettings

SINKS = {
    "milvus": "pipeline.sinks.milvus:MilvusSinkConfig",
    "parquet": "pipeline.sinks.parquet:ParquetSinkConfig",
    "memory": "pipeline.sinks.memory:MemorySinkConfig",
}
BACKENDS = {
    "transformers": "pipeline.embedders.transformers_backend:TransformersBackend",
    "sglang": "pipeline.embedders.sglang_backend:SGLangBackend",
}
DEFAULT_SINK = "milvus"
DEFAULT_BACKEND = "transformers"


def _load(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _registered(builtin: dict[str, str], group: str, base: type) -> dict[str, type]:
    refs = dict(builtin)
    refs.update({ep.name: ep.value for ep in entry_points(group=group)})
    found = {}
    for name, ref in refs.items():
        cls = _load(ref)
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"plug-in {name!r} ({ref}) is not a {base.__name__}")
        found[name] = cls
    return found


@cache
def sink_kinds() -> dict[str, type[SinkSettings]]:
    """Every sink kind: the built-in ones, then those of installed plug-ins."""
    return _registered(SINKS, "embed_job.sinks", SinkSettings)


@cache
def backends() -> dict[str, type[ModelSettings]]:
    """Every embedder backend: the built-in ones, then those of installed plug-ins."""
    return _registered(BACKENDS, "embed_job.backends", ModelSettings)


def _tag(key: str, default: str) -> Any:
    def tag(value: Any) -> Any:
        if isinstance(value, dict):
            return value.get(key, default)
        return getattr(value, key, default)
    return tag


def _union(kinds: dict[str, type], key: str, default: str) -> Any:
    """The discriminated union of the plug-ins' settings, on ``key`` (``default`` when the job
    file leaves it out), so pydantic reports the chosen plug-in's problems only."""
    members = tuple(Annotated[cls, Tag(name)] for name, cls in kinds.items())
    return Annotated[Union[members], Field(discriminator=Discriminator(  # noqa: UP007
        _tag(key, default),
        custom_error_type="unknown_plugin",
        custom_error_message=f"{key}: expected one of {', '.join(map(repr, kinds))}",
        custom_error_context={"key": key}))]


def sink_union() -> Any:
    return _union(sink_kinds(), "kind", DEFAULT_SINK)


def backend_union() -> Any:
    return _union(backends(), "backend", DEFAULT_BACKEND)
