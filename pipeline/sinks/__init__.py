"""Sinks: where vectors go. Each kind is a plug-in: its settings class (registered in
``job/plugins.py``) knows the kind's facts and builds the sink, importing the kind's client
library only then."""

from __future__ import annotations

from pipeline.sinks.base import GenerationMark, Sink, VectorBatch

__all__ = ["GenerationMark", "Sink", "VectorBatch"]
