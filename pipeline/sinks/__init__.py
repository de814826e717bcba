"""Sinks: where vectors go. Each kind is a plug-in: its settings class (registered in
``job/plugins.py``) knows the kind's facts and builds the sink, importing the kind's client
library only then. ``memory.py`` is the reference implementation of the protocols."""

from __future__ import annotations

from pipeline.sinks.base import Destination, GenerationMark, Generations, Sink, VectorBatch

__all__ = ["Destination", "GenerationMark", "Generations", "Sink", "VectorBatch"]
