"""Token-exact chunking: the ids counted are the ids embedded."""

from pipeline.chunking.splitter import Chunker
from pipeline.chunking.tokens import ModelTokenizer

__all__ = ["Chunker", "ModelTokenizer"]
