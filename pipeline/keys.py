"""Deterministic primary keys: the same chunk of the same job always gets the same key."""

from __future__ import annotations

import hashlib


def chunk_pk(fingerprint: str, doc_id: str, chunk_index: int) -> str:
    """128-bit hex key of (job fingerprint, doc id, chunk index).

    The fingerprint covers model, revision, dimension, pooling and chunker settings, so a
    re-embedding with other settings never overwrites these vectors by accident. 128 bits keep
    collisions out of reach even at billions of chunks (64 bits would not).
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(fingerprint.encode())
    h.update(b"\x00")
    h.update(doc_id.encode("utf-8", "surrogatepass"))
    h.update(b"\x00")
    h.update(str(chunk_index).encode())
    return h.hexdigest()
