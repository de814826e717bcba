"""embed-job: turn a corpus into vectors in a vector database, resumably."""

__version__ = "0.1.0"
