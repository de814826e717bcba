"""The Milvus sink's settings and facts; the sink itself (``sink.py``, with its connection in
``client.py`` and its schema in ``schema.py``: pymilvus) is imported only when a job writes to
Milvus.

A generation is one collection per fingerprint (``<alias>__<fp>``), updated in place by runs
with the same settings, so a nightly sync touches only what changed; readers use the alias.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal
from urllib.parse import unquote

from pydantic import Field, model_validator

from pipeline.errors import ConfigError
from pipeline.job.sections import SinkSettings, Strict
from pipeline.secrets import mask_uri, uri_secret, without_userinfo
from pipeline.sinks.fields import MAX_DOC_ID_BYTES
from pipeline.sinks.paths import blocked, nearest_existing

if TYPE_CHECKING:
    from pipeline.sinks.base import GenerationMark
    from pipeline.sinks.milvus.sink import MilvusSink

_SERVER_URI = re.compile(r"^(https?|tcp)://", re.IGNORECASE)
# What a Milvus server accepts as a collection or alias name (Lite is laxer: it takes '-').
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NAME_MAX = 255
_GENERATION_SEPARATOR = "__"
_GENERATION_SUFFIX = len(_GENERATION_SEPARATOR) + 16  # and the fingerprint's 16 hex digits
# validate waits this long for a server, not a run's sink.timeout_s per call: a firewalled
# host should not hold up a check
_PROBE_TIMEOUT_S = 10.0
CALL_TIMEOUT_S = 60.0  # sink.timeout_s's default: the longest one call may take


def is_server_uri(uri: str) -> bool:
    """True for ``http(s)://`` / ``tcp://`` URIs; anything else is a Milvus Lite path."""
    return bool(_SERVER_URI.match(uri))


class IndexConfig(Strict):
    type: str = "AUTOINDEX"
    metric: Literal["COSINE", "IP", "L2"] = "COSINE"
    params: dict[str, Any] = Field(default_factory=dict)


class TLSConfig(Strict):
    """Certificates for TLS to a Milvus server: PEM files, paths relative to the job file."""

    ca_cert: str | None = Field(
        None, description="the CA that signed the server's certificate (default: the system's)")
    client_cert: str | None = Field(
        None, description="this client's certificate, for a server that asks for one (mutual TLS)")
    client_key: str | None = Field(None, description="the client certificate's private key")
    server_name: str | None = Field(
        None, description="the name the server's certificate carries, when not the URI's host")

    @model_validator(mode="after")
    def _pairs(self) -> TLSConfig:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("sink.tls.client_cert and sink.tls.client_key go together")
        if self.client_cert and not self.ca_cert:
            # pymilvus sends a client certificate only together with a CA file
            raise ValueError("sink.tls.client_cert needs sink.tls.ca_cert (the CA of the "
                             "server's certificate)")
        return self

    def files(self) -> dict[str, str]:
        """The certificate files given, by key, as written in the job file."""
        return {key: path for key in ("ca_cert", "client_cert", "client_key")
                if (path := getattr(self, key)) is not None}

    def resolved(self, resolve: Callable[[str], Path]) -> TLSConfig:
        """A copy whose file paths are resolved (relative to the job file)."""
        return self.model_copy(update={k: str(resolve(p)) for k, p in self.files().items()})


class MilvusSinkConfig(SinkSettings):
    """Vectors into Milvus: a Milvus Lite database (a local path) or a server (a URI)."""

    where_key: ClassVar[str] = "sink.uri"

    kind: Literal["milvus"] = "milvus"
    uri: str | None = Field(None, description="a Milvus Lite path or http(s)://host:port")
    token: str | None = Field(None, description="inline token (user:password); prefer token_env")
    token_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="the environment variable that holds the token, read when the sink is made")
    secure: bool | None = Field(
        None, description="TLS to the server; default: on for https:// URIs and when tls is set")
    tls: TLSConfig | None = None
    index: IndexConfig = Field(default_factory=IndexConfig)
    timeout_s: float = Field(
        CALL_TIMEOUT_S, gt=0, description="the longest one call to Milvus may take (pymilvus's own retries "
        "included) before it counts as a transient failure and is tried again")

    @model_validator(mode="after")
    def _target(self) -> MilvusSinkConfig:
        if not self.uri:
            raise ValueError("sink.uri is required for a milvus sink")
        if self.token is not None and self.token_env is not None:
            raise ValueError("sink.token and sink.token_env: give one of them, not both")
        head, sep, _ = self.uri.partition("://")
        scheme = head.lower() if sep else ""
        if self.secure is False and (scheme == "https" or self.tls):
            raise ValueError("sink.secure: false, but " + (
                "the URI is https://" if scheme == "https" else "sink.tls is set")
                + "; remove one of them")
        self.secure = bool(self.secure or scheme == "https" or self.tls)
        if self.secure and scheme not in ("http", "https", "tcp"):
            raise ValueError("sink.secure / sink.tls: TLS is for a Milvus server "
                             "(http(s)://host:port), not a Milvus Lite path")
        return self

    # -- facts ------------------------------------------------------------------------------

    @property
    def remote(self) -> bool:
        """A server URI; anything else is a Milvus Lite path on this machine."""
        return is_server_uri(self.uri or "")

    def local_path(self, resolve: Callable[[str], Path]) -> Path | None:
        return None if self.remote else resolve(self.uri or "")

    def location(self, resolve: Callable[[str], Path]) -> str:
        return mask_uri(self.uri or "") if self.remote else str(resolve(self.uri or ""))

    def target_name(self, alias: str, fingerprint: str, generation: int) -> str:
        return f"{alias}{_GENERATION_SEPARATOR}{fingerprint}"

    def describe(self, resolve: Callable[[str], Path], target: str, alias: str) -> str:
        return f"{self.location(resolve)} collection {target} (alias {alias})"

    def published_as(self, alias: str) -> str:
        return f"the alias {alias!r}"

    def identity_where(self) -> str:
        return without_userinfo(self.uri or "")

    def doc_id_limit(self) -> int | None:
        return MAX_DOC_ID_BYTES

    def resolved_token(self) -> str | None:
        """The token, from the job file or from the variable ``token_env`` names. Read here,
        when the sink is made or validated, not when the job file is loaded, so that
        ``validate`` reports an unset variable as one of its problems."""
        if self.token_env is None:
            return self.token
        value = os.environ.get(self.token_env)
        if not value:
            raise ConfigError(f"sink.token_env: environment variable {self.token_env} is not set "
                              f"(or empty); export it with the server's token (user:password)")
        return value

    def secrets(self) -> list[str]:
        """The token (and the password half of ``user:password``) and the URI's userinfo."""
        try:
            token = self.resolved_token()
        except ConfigError:
            token = None
        # the password half alone only when it cannot be an ordinary word of a message
        # (the default 'root:Milvus' would turn "Milvus Lite" into "*** Lite")
        password = token.partition(":")[2] if token else ""
        found = [token, password if len(password) >= 8 else ""] if token else []
        in_uri = uri_secret(self.uri or "")
        if in_uri:
            found += [in_uri, unquote(in_uri)]
        return list(dict.fromkeys(s for s in found if s))

    def problems(self, resolve: Callable[[str], Path]) -> list[str]:
        """The token variable and certificate files, checked before anything connects
        (pymilvus opens the files only when it connects, and a missing one would be a
        traceback)."""
        problems = []
        try:
            self.resolved_token()
        except ConfigError as e:
            problems.append(str(e))
        for key, path in (self.tls.files() if self.tls else {}).items():
            file = resolve(path)
            try:
                file.open("rb").close()
            except OSError as e:
                problems.append(f"sink.tls.{key}: cannot read {file}: {e.strerror or e}")
        return problems

    def destination_problems(self, resolve: Callable[[str], Path], alias: str) -> list[str]:
        """A name a server refuses or too long for a generation's name; a Lite path where
        no db can be."""
        problems = []
        if self.remote and not _NAME.match(alias):
            problems.append(self._name_problem(alias))
        if len(alias.encode()) + _GENERATION_SUFFIX > _NAME_MAX:
            problems.append(f"sink.collection: {alias[:20]!r}... is too long: each generation "
                            f"is a collection <name>__<16 hex digits>, at most {_NAME_MAX} "
                            f"bytes; use at most {_NAME_MAX - _GENERATION_SUFFIX}")
        db = self.local_path(resolve)
        if db is not None:
            existing = nearest_existing(db)
            if existing == db and not db.is_dir():
                problems.append(f"sink.uri: {db} exists and is not a Milvus Lite db (a Lite "
                                f"db is a directory); remove it or point sink.uri elsewhere")
            elif not existing.is_dir():
                problems.append(f"sink.uri: {blocked(db, existing)}; point sink.uri elsewhere")
        return problems

    def warnings(self, job_file: str, from_env: AbstractSet[str], alias: str) -> list[str]:
        """A token written in the job file (which tends to end up in git), said louder when
        the file is readable by group or others, as ssh says for a private key; a collection
        name Lite takes but a server refuses (a job name with '-'): the job runs, but its
        index cannot move to a server under the same name."""
        found = []
        if self.token is not None and "sink.token" not in from_env:
            text = "sink.token is written in the job file"
            try:
                mode = stat.S_IMODE(Path(job_file).stat().st_mode)
            except OSError:
                mode = 0
            if mode & 0o044:
                text += f", which group/others can read (mode {mode:04o})"
            found.append(f"{text}; put the token in an environment variable and name it in "
                         f"sink.token_env")
        if not self.remote and not _NAME.match(alias):
            found.append(f"{self._name_problem(alias)} (Milvus Lite accepts it, a server would "
                         f"not)")
        return found

    def probe(self, resolve: Callable[[str], Path], alias: str) -> MilvusSink:
        sink = self.make(resolve, alias, alias)
        if self.remote:
            sink.timeout = min(_PROBE_TIMEOUT_S, self.timeout_s)
        return sink

    def _name_problem(self, alias: str) -> str:
        what = repr(alias) if self.collection else f"the job name {alias!r} (the default)"
        return (f"sink.collection: {what} is not a Milvus collection name (letters, digits and "
                f"_, not starting with a digit); set sink.collection, e.g. {_suggest(alias)!r}")

    # -- the sink ---------------------------------------------------------------------------

    def make(self, resolve: Callable[[str], Path], alias: str, target: str,
             base: str | None = None, file_metadata: Mapping[str, str] | None = None,
             mark: GenerationMark | None = None) -> MilvusSink:
        from pipeline.sinks.milvus.sink import MilvusSink

        uri = self.uri or ""
        return MilvusSink(uri if self.remote else str(resolve(uri)), target,
                          token=self.resolved_token(), index=self.index,
                          store_text=self.store_text, alias=alias, mark=mark,
                          timeout=self.timeout_s, secure=bool(self.secure),
                          tls=self.tls.resolved(resolve) if self.tls else None)


def _suggest(name: str) -> str:
    fixed = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return fixed if _NAME.match(fixed) else f"_{fixed}"
