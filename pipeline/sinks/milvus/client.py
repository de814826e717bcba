"""The connection to Milvus: a Lite db or a server, the quirks of each, and every call's
failure as a retryable TransientError or a one-line SinkError.

Measured behaviour this relies on (pymilvus 3.0, milvus-lite 3.2): a Lite db is a directory
that belongs to one process (another gets ``DataDirLockedError``, which milvus-lite only
logs); Lite accepts index types it never builds, so they are checked here, also behind a
``milvus-lite server`` URI; pymilvus reports refused credentials and an untrusted
certificate as a failed connect, which no retry fixes.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
from pymilvus import MilvusClient, MilvusException

from pipeline.errors import SinkError, TransientError
from pipeline.secrets import client_logs_configured, mask_uri
from pipeline.sinks.milvus import CALL_TIMEOUT_S, IndexConfig, TLSConfig, is_server_uri

client_logs_configured()  # importing pymilvus (above) set its loggers' levels again
T = TypeVar("T")

# Opening a Lite db: tries when its local server cannot be reached, and the first wait.
LITE_OPEN_TRIES = 3
LITE_OPEN_DELAY_S = 1.0
_log = logging.getLogger(__name__)

# What Milvus Lite 3.2 really builds; others are accepted, reported "Finished", never built.
LITE_INDEX_TYPES = ("AUTOINDEX", "HNSW", "HNSW_SQ", "IVF_FLAT", "IVF_SQ8", "FLAT", "BRUTE_FORCE")

_TRANSIENT_GRPC = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                   grpc.StatusCode.RESOURCE_EXHAUSTED}
# pymilvus CONNECT_FAILED / server ServiceUnavailable, and RATE_LIMIT.
_TRANSIENT_CODES = {2, 8}
_TRANSIENT_WORDS = ("unavailable", "rate limit", "deadline exceeded", "timed out", "timeout",
                    "connection refused", "retry run out", "not ready")
# What pymilvus reports as a failed connect (code 2) but no retry fixes.
_REFUSED_GRPC = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
_CERT_FAILURES = ("certificate_verify_failed", "verification check failed")


class MilvusConnection:
    """A connection for one collection, opened on first use; every pymilvus call goes
    through ``_call``, so its failure names the collection and says whether to retry."""

    def __init__(self, uri: str | Path, collection: str, *, token: str | None = None,
                 index: IndexConfig | None = None, timeout: float = CALL_TIMEOUT_S,
                 secure: bool = False, tls: TLSConfig | None = None) -> None:
        """``uri``: a resolved Lite path ending in .db, or a server URI. ``timeout`` bounds
        each call (``_call``), pymilvus's own retries included, so a dead server surfaces as a
        TransientError for the runner to retry instead of hanging. ``secure``: TLS (implied
        by https://), with ``tls``'s certificates (paths already resolved). ``index``: the
        job's, checked against what Lite builds."""
        self.uri = str(uri)
        self.collection = collection
        self.is_lite = not is_server_uri(self.uri)
        self.token = token or ""
        self.secure = secure or self.uri.lower().startswith("https://")
        self.tls = tls or TLSConfig()
        self.index = index or IndexConfig()
        self.timeout = timeout
        self.where = f"milvus {mask_uri(self.uri)} collection {collection!r}"  # in messages
        self._client: MilvusClient | None = None
        if self.is_lite:
            self._check_lite_target()

    def connect(self) -> MilvusClient:
        """Open the client once; TransientError when a server cannot be reached."""
        if self._client is None:
            self._client = self._open_server() if is_server_uri(self.uri) else self._open_lite()
        return self._client

    def close(self) -> None:
        """Release the connection. A Lite db stays open in this process until it exits
        (milvus-lite keeps one server per path), so reopening it here is cheap."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def client_kwargs(self) -> dict[str, Any]:
        """What ``MilvusClient`` gets besides the server URI. pymilvus verifies the server
        against ``server_pem_path`` alone, and sends a client certificate only together with
        ``ca_pem_path`` (then the CA for the server's certificate too)."""
        kwargs: dict[str, Any] = {"token": self.token, "timeout": self.timeout,
                                  "secure": self.secure}
        if self.tls.server_name:
            kwargs["server_name"] = self.tls.server_name
        if self.tls.client_cert:
            kwargs.update(ca_pem_path=self.tls.ca_cert, client_pem_path=self.tls.client_cert,
                          client_key_path=self.tls.client_key)
        elif self.tls.ca_cert:
            kwargs["server_pem_path"] = self.tls.ca_cert
        return kwargs

    def remove_torn_lite_create(self) -> None:
        """A process killed inside Lite's create_collection leaves a directory holding only
        ``schema.json.tmp``; every later create of that name then fails with 'File exists'.
        Called before a create (has_collection said no), so the leftover is removed."""
        if not self.is_lite or is_server_uri(self.uri):
            return
        leftover = Path(self.uri) / "collections" / self.collection
        if leftover.is_dir() and not (leftover / "schema.json").exists():
            shutil.rmtree(leftover)

    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one pymilvus call; its failure becomes a TransientError or a one-line SinkError.

        A method of the open client gets the connection's deadline unless given one: pymilvus
        waits forever by default, so a server (or Lite's in-process one) that stops answering
        would hang the run instead of failing it resumably."""
        if self._client is not None and getattr(fn, "__self__", None) is self._client:
            kwargs.setdefault("timeout", self.timeout)
        try:
            return fn(*args, **kwargs)
        except (MilvusException, grpc.RpcError) as e:
            refused = _refusal(e)
            message = f"{self.where}: {what}: {_described(e)}"
            if refused:
                message += f"; {refused}"
            raise (TransientError(message) if _is_transient(e) else SinkError(message)) from e

    def load(self, name: str) -> None:
        """Load a collection (a reopened Lite db starts with its collections released).

        milvus-lite 3.2 writes a segment's index file in place (``indexes/*.idx`` beside the
        segment's data) and, finding one, loads it without a fallback: a process killed while
        writing one leaves a Lite collection that fails to load for good ("No data left in
        file"). The index files are derived from the data, so a Lite load that fails is tried
        once more without that collection's index files, which Lite then rebuilds."""
        client = self.connect()
        try:
            self._call(f"load of {name!r}", client.load_collection, name)
        except SinkError as e:
            if is_server_uri(self.uri):
                raise
            derived = list((Path(self.uri) / "collections" / name / "partitions")
                           .glob("*/indexes/*.idx"))
            if not derived:
                raise
            for path in derived:
                path.unlink()
            _log.warning(
                "%s: rebuilding the index of collection %r (its index files did not load: %s)",
                self.uri, name, str(e).rsplit(": ", 1)[-1])
            self._call(f"load of {name!r}", client.load_collection, name)

    def _check_lite_target(self) -> None:
        if not self.uri.endswith(".db"):
            raise SinkError(f"milvus {self.uri}: a Milvus Lite path must end in .db "
                            "(or use an http:// URI for a server)")
        self._check_lite_index()

    def _check_lite_index(self) -> None:
        if self.index.type.upper() not in LITE_INDEX_TYPES:
            raise SinkError(f"milvus {mask_uri(self.uri)}: index type {self.index.type!r} is not "
                            f"built by Milvus Lite (it would silently search brute force); use "
                            f"one of {', '.join(LITE_INDEX_TYPES)}")

    def _open_lite(self) -> MilvusClient:
        """Open the Lite db; the real cause of a failure is only logged by milvus-lite.

        A failed connect to Lite's local server is tried again (``LITE_OPEN_TRIES``): pymilvus
        3.0 keeps one connection per server in a process and, when it sat idle for 30 s, checks
        and rebuilds it at the next open; that rebuild was seen to fail once on a loaded host
        ("Fail connecting to server", the server's GOAWAY "too_many_pings" before it)."""
        path = Path(self.uri)
        if path.exists() and not path.is_dir():
            raise SinkError(f"milvus {self.uri}: exists and is not a Milvus Lite db (a Lite db "
                            "is a directory)")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            file = next((p for p in (path.parent, *path.parent.parents)
                         if p.exists() and not p.is_dir()), None)
            why = f"{file} is a file" if file else e.strerror or _one_line(e)
            raise SinkError(f"milvus {self.uri}: cannot create the Lite db's directory "
                            f"{path.parent}: {why}") from None
        for attempt in range(1, LITE_OPEN_TRIES + 1):
            with _logged_exceptions("milvus_lite.server_manager") as causes:
                try:
                    return MilvusClient(str(path), timeout=self.timeout)
                except MilvusException as e:
                    causes.append(e)
            cause = causes[0]
            if type(cause).__name__ == "DataDirLockedError":
                raise SinkError(
                    f"milvus {self.uri}: the Lite db is in use by another process; stop it, or "
                    f"serve the db with `milvus-lite server --data-dir {path} --host 127.0.0.1 "
                    "--port 19530` and set sink.uri to http://127.0.0.1:19530") from cause
            if attempt == LITE_OPEN_TRIES or not _is_transient(cause):
                break
            _log.warning("milvus %s: opening the Lite db failed (%s); trying again", self.uri,
                         _one_line(cause))
            time.sleep(LITE_OPEN_DELAY_S * attempt)
        raise SinkError(
            f"milvus {self.uri}: cannot open the Lite db: {_one_line(cause)}") from cause

    def _open_server(self) -> MilvusClient:
        """Connect; a ``milvus-lite server`` behind the URI gets Lite's index check too."""
        client = self._call("connect", MilvusClient, self.uri, **self.client_kwargs())
        if str(self._call("server version", client.get_server_version)).startswith("milvus_lite"):
            self.is_lite = True
            self._check_lite_index()
        return client


def _refusal(e: BaseException) -> str | None:
    """What to fix when the server refused us (credentials, certificate): pymilvus says only
    "illegal connection params or server unavailable", with the gRPC status as the cause."""
    rpc = e if isinstance(e, grpc.RpcError) else e.__cause__
    if not isinstance(rpc, grpc.RpcError):
        return None
    if rpc.code() in _REFUSED_GRPC:
        return ("the server refused the credentials: check sink.token_env, sink.token or the "
                "URI's user:password")
    if any(word in (rpc.details() or "").lower() for word in _CERT_FAILURES):
        return ("the server's TLS certificate did not verify: check sink.tls.ca_cert and "
                "sink.tls.server_name")
    return None


def _is_transient(e: BaseException) -> bool:
    """Worth retrying: unreachable, overloaded, timed out (pymilvus has already retried);
    never refused credentials or an untrusted certificate."""
    if _refusal(e):
        return False
    code = e.code() if isinstance(e, grpc.RpcError) else getattr(e, "code", None)
    if isinstance(code, grpc.StatusCode):
        return code in _TRANSIENT_GRPC
    if code in _TRANSIENT_CODES or getattr(e, "retriable", False):
        return True
    return any(word in _one_line(e).lower() for word in _TRANSIENT_WORDS)


def _one_line(e: BaseException) -> str:
    if isinstance(e, grpc.RpcError):
        text = f"{e.code()}: {e.details()}"
    else:
        text = getattr(e, "message", "") or str(e) or type(e).__name__
    return " ".join(str(text).split())[:500]


def _described(e: BaseException) -> str:
    """``_one_line``, followed by the gRPC failure a pymilvus error wraps (the real reason a
    connect failed: refused, unreachable, TLS handshake)."""
    if isinstance(e.__cause__, grpc.RpcError) and not isinstance(e, grpc.RpcError):
        return f"{_one_line(e)} ({_one_line(e.__cause__)})"
    return _one_line(e)


class _Capture(logging.Filter):
    """Keeps the exceptions a logger reports, and drops those records (no stray traceback)."""

    def __init__(self, sink: list[BaseException]) -> None:
        super().__init__()
        self.sink = sink

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            self.sink.append(record.exc_info[1])
            return False
        return True


@contextmanager
def _logged_exceptions(logger_name: str) -> Iterator[list[BaseException]]:
    logger = logging.getLogger(logger_name)
    causes: list[BaseException] = []
    capture = _Capture(causes)
    logger.addFilter(capture)
    try:
        yield causes
    finally:
        logger.removeFilter(capture)
