"""The one interface every embedding backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

T = TypeVar("T")


class Embedder(ABC):
    """Token ids in, one float32 vector per sequence out.

    Backends never tokenize: the chunker's token ids are exactly what is embedded, so the
    tokens counted for batching are the tokens computed on.

    A backend implements ``embed_batch`` and says what it is (``name``, ``max_context``,
    ``native_dim``): a property, or a class attribute when it is a constant; one left out
    keeps the class from being instantiated.
    """

    @property
    @abstractmethod
    def name(self) -> str:
        """The model's name, for messages."""

    @property
    @abstractmethod
    def max_context(self) -> int:
        """The longest sequence, special tokens included, that ``embed_batch`` takes."""

    @property
    @abstractmethod
    def native_dim(self) -> int:
        """The width of the vectors ``embed_batch`` returns, before any Matryoshka cut."""

    @abstractmethod
    def embed_batch(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """Return an (len(batch), native_dim) float32 array, not yet normalized or truncated."""

    def embed_stream(self, batches: Iterable[tuple[T, Sequence[Sequence[int]]]]
                     ) -> Iterator[tuple[T, np.ndarray]]:
        """Embed batches in order; backends that can keep several in flight override this."""
        for key, batch in batches:
            yield key, self.embed_batch(batch)

    def release_memory(self) -> None:
        """After an out-of-memory error, before a smaller retry: give cached device memory
        back. Nothing to do for a backend without such a cache."""

    def close(self) -> None:
        """Release the device / engine. Safe to call twice."""

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def model_name(path: Path) -> str:
    """The model directory's name; for a hub-cache snapshot (named by commit), the repo's name."""
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name[len("models--"):].replace("--", "/")
    return path.name
