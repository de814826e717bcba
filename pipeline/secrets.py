"""Keeping secrets out of everything the product prints or writes.

A secret can reach output two ways: in a URI's userinfo (``http://user:password@host``;
pymilvus also takes a bare ``http://token@host`` as the token) and quoted inside an
exception message from a client library. ``mask_uri`` handles the first where a URI is
shown on purpose; ``redact`` is the last filter before text leaves the process.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

MASK = "***"

# scheme://userinfo@ — the userinfo ends at the last '@' before the host's '/', '?' or '#'.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s/?#]*)@")


def _mask_userinfo(match: re.Match[str]) -> str:
    user, colon, _ = match["userinfo"].partition(":")
    shown = f"{user}:{MASK}" if colon else MASK  # a bare userinfo is a token to pymilvus
    return f"{match['scheme']}{shown}@"


def mask_uri(uri: str) -> str:
    """``uri`` with the secret part of its userinfo shown as ``***``."""
    return _USERINFO.sub(_mask_userinfo, uri, count=1)


def uri_secret(uri: str) -> str | None:
    """The secret in ``uri``'s userinfo: the password, or a bare userinfo (a token)."""
    match = _USERINFO.match(uri)
    if match is None:
        return None
    user, colon, password = match["userinfo"].partition(":")
    return (password if colon else user) or None


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every secret replaced by ``***`` and every URI's userinfo masked."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return _USERINFO.sub(_mask_userinfo, text)


@contextmanager
def redacted_logging(secrets: Iterable[str]) -> Iterator[None]:
    """Log records made meanwhile (pymilvus and milvus-lite log through their own handlers)
    carry their message and traceback already redacted, whichever handler prints them."""
    hidden = tuple(secrets)
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            record.msg, record.args = redact(record.getMessage(), hidden), ()
        except (TypeError, ValueError):  # a malformed call: logging reports it at emit time
            return record
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info), hidden)
        return record

    logging.setLogRecordFactory(factory)
    try:
        yield
    finally:
        logging.setLogRecordFactory(previous)


_CLIENT_LOGGERS = ("pymilvus", "milvus_lite")
_quiet = 0  # how many quiet_client_logs blocks are open


@contextmanager
def quiet_client_logs() -> Iterator[None]:
    """pymilvus and milvus-lite log whole tracebacks of failed calls on stderr; the product
    turns each failure into its own one-line message, so their records are dropped. pymilvus
    sets its loggers' levels when first imported, which a run does inside this block: the
    product's Milvus client calls ``client_logs_configured`` after that import."""
    global _quiet
    loggers = [logging.getLogger(name) for name in _CLIENT_LOGGERS]
    levels = [lg.level for lg in loggers]
    _quiet += 1
    client_logs_configured()
    try:
        yield
    finally:
        _quiet -= 1
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def client_logs_configured() -> None:
    """Quiet the client libraries' loggers again where a ``quiet_client_logs`` block is open."""
    if _quiet:
        for name in _CLIENT_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def without_userinfo(uri: str) -> str:
    """The URI as written, less any ``user:password@``: safe to record and to show."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))

