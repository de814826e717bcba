"""Credentials: taken from the environment, never shown or stored; TLS to Milvus servers.

Recognisable secrets are planted in every place a job can give one (an inline token, the
variable ``sink.token_env`` names, a URI's password) and every output and every file the
product writes is searched for them. The test marked ``server`` runs TLS (one-way and mutual)
and authentication against a real Milvus 2.3 server; the server binds every interface, so
the test runs this file as a script under ``unshare -n`` (as tests/milvus_server.py does).
"""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from helpers.cli import Result, invoke, run
from helpers.jobs import make_job, state_dir
from milvus_server import (
    print_server_logs,
    run_script_in_namespace,
    start_server,
    stop_server,
)
from pymilvus import MilvusException

from pipeline.errors import ConfigError, SinkError
from pipeline.job.load import load_job
from pipeline.secrets import mask_uri, redact, redacted_logging
from pipeline.sinks.milvus import MilvusSinkConfig
from pipeline.sinks.milvus.sink import MilvusSink

INLINE = "root:InlineSecret7f3a"
ENV_TOKEN = "root:EnvSecret9c2b"
URI_PASSWORD = "UriSecret4d1e"
# The password halves are what must not appear; a token's user name may.
PLANTED = ("InlineSecret7f3a", "EnvSecret9c2b", URI_PASSWORD)
DOCS = [{"id": f"d{i}", "text": f"document {i} about keeping secrets", "title": "t"}
        for i in range(3)]
OK_LINE = "credentials server checks ok"
SERVER_NAME = "milvus.test"  # the only name in the test server's certificate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def make_certs(directory: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for SERVER_NAME only, and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "san.ext").write_text(f"subjectAltName=DNS:{SERVER_NAME}\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-days", "2", "-subj", "/CN=embed-job test CA")
    for name, cn, ext in (("server", SERVER_NAME, ["-extfile", "san.ext"]),
                          ("client", "embed-job", [])):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                f"{name}.csr", "-subj", f"/CN={cn}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", *ext)
    return {name: directory / name for name in ("ca.pem", "server.pem", "server.key",
                                                "client.pem", "client.key")}


def error_lines(done: Result) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.strip()]


def leaks(texts: list[str], root: Path, keep_out: tuple[Path, ...] = ()) -> list[str]:
    """Where a planted secret shows: in one of ``texts``, or in a file under ``root`` (the
    job file, which holds the secret on purpose, is left out via ``keep_out``)."""
    found = [f"output {i}: {s}" for i, text in enumerate(texts) for s in PLANTED if s in text]
    for path in root.rglob("*"):
        if path.is_file() and path not in keep_out:
            data = path.read_bytes()
            found += [f"{path}: {s}" for s in PLANTED if s.encode() in data]
    return found


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def lite_server(tmp_path: Path) -> Iterator[str]:
    """A plain (no TLS, no authentication) ``milvus-lite server`` on localhost."""
    from milvus_server import lite_server as serve

    with serve(tmp_path / "served.db") as uri:
        yield uri.removeprefix("http://")


# ---------------------------------------------------------------------------- masking


@pytest.mark.parametrize("uri, shown", [
    ("http://user:hunter2@host:19530", "http://user:***@host:19530"),
    ("https://root:p%40ss@host:19530/db", "https://root:***@host:19530/db"),
    ("http://u:p@ss@host:19530", "http://u:***@host:19530"),  # unencoded '@' in the password
    ("http://apikey@host:19530", "http://***@host:19530"),  # pymilvus: a bare user is a token
    ("http://host:19530", "http://host:19530"),
    ("out/vectors.db", "out/vectors.db"),
])
def test_mask_uri(uri: str, shown: str) -> None:
    assert mask_uri(uri) == shown


def test_redact_takes_out_secrets_and_uri_passwords() -> None:
    text = f"connect to http://u:{URI_PASSWORD}@h:1 with {INLINE} failed; token {INLINE[5:]}"
    assert redact(text, [INLINE, INLINE[5:]]) == "connect to http://u:***@h:1 with *** failed; token ***"


def test_secrets_of_a_sink(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MILVUS_TOKEN", ENV_TOKEN)
    config = MilvusSinkConfig(uri=f"http://root:{URI_PASSWORD}@h:19530", token_env="MILVUS_TOKEN")
    assert set(config.secrets()) == {ENV_TOKEN, "EnvSecret9c2b", URI_PASSWORD}
    monkeypatch.delenv("MILVUS_TOKEN")
    assert config.secrets() == [URI_PASSWORD]  # an unset variable holds nothing to hide


def test_pymilvus_log_lines_are_redacted() -> None:
    """pymilvus logs through its own handlers; the record is redacted when it is made."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("pymilvus.decorators")
    logger.addHandler(handler)
    logger.propagate = False  # not on to pymilvus's console handler: no noise in the test log
    try:
        with redacted_logging([INLINE]):
            logger.warning("retry with token %s on %s", INLINE, f"http://u:{URI_PASSWORD}@h")
            try:
                raise RuntimeError(f"bad token {INLINE}")
            except RuntimeError:
                logger.exception("failed")
        logger.warning("after %s", "x")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    text = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in records)
    assert "retry with token *** on http://u:***@h" in text and "after x" in text
    assert not [s for s in PLANTED if s in text], text


# ------------------------------------------------------------------ token and TLS settings


def test_token_env_is_read_when_the_sink_is_made(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    config = MilvusSinkConfig(uri="http://h:19530", token_env="MILVUS_TOKEN")
    monkeypatch.delenv("MILVUS_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="environment variable MILVUS_TOKEN is not set"):
        config.make(lambda p: tmp_path / p, "c", "c__x")
    monkeypatch.setenv("MILVUS_TOKEN", ENV_TOKEN)
    sink = config.make(lambda p: tmp_path / p, "c", "c__x")
    assert isinstance(sink, MilvusSink) and sink.client_kwargs()["token"] == ENV_TOKEN


@pytest.mark.parametrize("sink, expected", [
    ({"uri": "http://h:19530"}, {"secure": False}),
    ({"uri": "https://h:19530"}, {"secure": True}),
    ({"uri": "http://h:19530", "secure": True}, {"secure": True}),
    ({"uri": "http://h:19530", "tls": {"ca_cert": "certs/ca.pem", "server_name": "m.test"}},
     {"secure": True, "server_pem_path": "certs/ca.pem", "server_name": "m.test"}),
    ({"uri": "https://h:19530", "tls": {"ca_cert": "certs/ca.pem", "client_cert": "c.pem",
                                        "client_key": "/abs/c.key"}},
     {"secure": True, "ca_pem_path": "certs/ca.pem", "client_pem_path": "c.pem",
      "client_key_path": "/abs/c.key"}),
])
def test_tls_options_reach_the_client(tmp_path: Path, sink: dict[str, Any],
                                      expected: dict[str, Any]) -> None:
    """pymilvus verifies the server against server_pem_path alone, and sends a client
    certificate only with ca_pem_path; paths are relative to the job file."""
    sink_obj = MilvusSinkConfig(**sink).make(lambda p: tmp_path / p, "c", "c__x")
    assert isinstance(sink_obj, MilvusSink)
    kwargs = sink_obj.client_kwargs()
    resolved = {k: str(tmp_path / v) if k.endswith("_path") and not v.startswith("/") else v
                for k, v in expected.items()}
    assert {k: v for k, v in kwargs.items() if k not in ("token", "timeout")} == resolved


@pytest.mark.parametrize("sink, message", [
    ({"uri": "http://h:1", "token": "a:b", "token_env": "T"},
     "sink.token and sink.token_env: give one of them, not both"),
    ({"uri": "http://h:1", "token_env": "NOT-A-NAME"}, "sink.token_env: String should match"),
    ({"uri": "https://h:1", "secure": False}, "sink.secure: false, but the URI is https://"),
    ({"uri": "http://h:1", "secure": False, "tls": {"ca_cert": "ca.pem"}},
     "sink.secure: false, but sink.tls is set"),
    ({"uri": "out.db", "secure": True}, "TLS is for a Milvus server"),
    ({"uri": "http://h:1", "tls": {"client_cert": "c.pem", "ca_cert": "ca.pem"}},
     "sink.tls.client_cert and sink.tls.client_key go together"),
    ({"uri": "http://h:1", "tls": {"client_cert": "c.pem", "client_key": "c.key"}},
     "sink.tls.client_cert needs sink.tls.ca_cert"),
    ({"uri": "http://h:1", "tls": {"ca_file": "ca.pem"}}, "sink.tls.ca_file: unknown key"),
    ({"uri": "http://h:1", "token": 12345}, "sink.token: Input should be a valid string"),
])
def test_bad_credential_settings(tmp_path: Path, sink: dict[str, Any], message: str) -> None:
    job = make_job(tmp_path, DOCS, sink=sink)
    with pytest.raises(ConfigError) as e:
        load_job(job)
    assert str(e.value).count("\n") == 0 and str(e.value).startswith(f"{job}: "), e.value
    assert message in str(e.value) and "12345" not in str(e.value), e.value


def test_environment_interpolation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = make_job(tmp_path, DOCS, sink={"uri": "http://root:${MILVUS_PW}@h:19530",
                                         "collection": "c_${SUFFIX}"},
                   model={"query_instruction": "costs $${PRICE}"})
    monkeypatch.delenv("MILVUS_PW", raising=False)
    monkeypatch.delenv("SUFFIX", raising=False)
    with pytest.raises(ConfigError) as e:
        load_job(job)
    assert sorted(str(e.value).splitlines()) == [  # one line per unset variable
        f"{job}: sink.collection: environment variable SUFFIX is not set (the job file says "
        "${SUFFIX})",
        f"{job}: sink.uri: environment variable MILVUS_PW is not set (the job file says "
        "${MILVUS_PW})"]
    monkeypatch.setenv("MILVUS_PW", URI_PASSWORD)
    monkeypatch.setenv("SUFFIX", "v2")
    loaded = load_job(job)
    assert loaded.sink.uri == f"http://root:{URI_PASSWORD}@h:19530"
    assert loaded.sink.collection == "c_v2" and loaded.model.query_instruction == "costs ${PRICE}"
    assert loaded.from_env == {"sink.uri", "sink.collection"}


# ------------------------------------------------------------------ validate and run


def test_unset_token_variable_is_refused_by_validate_and_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MILVUS_TOKEN", raising=False)
    job = make_job(tmp_path, DOCS, sink={"uri": "http://127.0.0.1:1", "token_env": "MILVUS_TOKEN"})
    line = (f"error: {job}: sink.token_env: environment variable MILVUS_TOKEN is not set (or "
            "empty); export it with the server's token (user:password)")
    for args in (("validate", str(job)), ("run", str(job), "--quiet")):
        result = invoke(*args)
        assert result.exit_code == 2 and result.stderr.splitlines() == [line], result.output
    assert not state_dir(job).run_dir.exists()  # refused before it started


def test_missing_certificate_file_is_refused_by_validate_and_run(tmp_path: Path) -> None:
    job = make_job(tmp_path, DOCS, sink={"uri": "http://127.0.0.1:1",
                                         "tls": {"ca_cert": "certs/ca.pem"}})
    line = (f"error: {job}: sink.tls.ca_cert: cannot read {tmp_path / 'certs/ca.pem'}: "
            "No such file or directory")
    for args in (("validate", str(job)), ("run", str(job), "--quiet")):
        result = invoke(*args)
        assert result.exit_code == 2 and result.stderr.splitlines() == [line], result.output


def test_validate_warns_of_an_inline_token(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    job = make_job(tmp_path, DOCS, sink={"uri": "http://127.0.0.1:1", "token": INLINE})
    warning = f"warning: {job}: sink.token is written in the job file"
    advice = "; put the token in an environment variable and name it in sink.token_env"
    job.chmod(0o644)
    result = invoke("validate", str(job), "--offline")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[0] == (
        f"{warning}, which group/others can read (mode 0644){advice}")
    assert yaml.safe_load(result.stdout)["sink"]["token"] == "***"
    job.chmod(0o600)
    result = invoke("validate", str(job), "--offline")
    assert result.stderr.splitlines()[0] == f"{warning}{advice}", result.output
    # a token interpolated from the environment is not inline
    job.write_text(job.read_text().replace(INLINE, "${MILVUS_TOKEN}"))
    monkeypatch.setenv("MILVUS_TOKEN", ENV_TOKEN)
    result = invoke("validate", str(job), "--offline")
    assert result.exit_code == 0 and "warning" not in result.stderr, result.output
    assert "EnvSecret9c2b" not in result.output


def test_no_secret_in_any_output_of_a_failing_run(tmp_path: Path) -> None:
    """Inline token and URI password; validate, run against a port nobody listens on (exit 6,
    one line), status: no output and no file written holds a secret."""
    port = free_port()
    job = make_job(tmp_path, DOCS, sink={"uri": f"http://root:{URI_PASSWORD}@127.0.0.1:{port}",
                                         "token": INLINE, "retries": 1,
                                         "retry_base_delay_s": 0.01})
    # real processes, in the job's directory: every line they let through counts (pymilvus
    # logs through its own handlers, gRPC's C core writes to the file descriptor)
    validate = invoke("validate", str(job), "--offline", process=True, cwd=tmp_path)
    assert validate.exit_code == 0, validate.stderr
    assert yaml.safe_load(validate.stdout)["sink"]["uri"] == f"http://root:***@127.0.0.1:{port}"
    ran = run(job, "--prom", "run.prom", process=True)
    assert ran.exit_code == 6, ran.stderr
    lines = error_lines(ran)
    assert len(lines) == 1 and lines[0].startswith(
        f"error: milvus http://root:***@127.0.0.1:{port} collection "), ran.stderr
    report = ran.report
    assert f"http://root:***@127.0.0.1:{port}" in report["error"], report
    status = invoke("status", str(job), "--json", process=True, cwd=tmp_path)
    assert status.exit_code == 0, status.stderr
    outputs = [p.stdout + p.stderr for p in (validate, ran, status)]
    assert (tmp_path / "run.prom").exists()
    assert leaks(outputs, tmp_path, keep_out=(job,)) == []


def test_no_secret_in_any_output_of_a_completed_run(tmp_path: Path, lite_server: str) -> None:
    """token_env and URI password, against a server that ignores them (``milvus-lite
    server``); a malformed row makes a dead letter; the summary is printed."""
    job = make_job(tmp_path, DOCS, sink={"uri": f"http://root:{URI_PASSWORD}@{lite_server}",
                                         "token_env": "MILVUS_TOKEN"},
                   max_dead_letter_ratio=1.0)
    with (tmp_path / "corpus.jsonl").open("a") as f:
        f.write("{not json\n")
    env = {"MILVUS_TOKEN": ENV_TOKEN}
    validate = invoke("validate", str(job), "--offline", process=True, cwd=tmp_path, env=env)
    ran = run(job, "--prom", "run.prom", quiet=False, process=True, env=env)
    assert ran.exit_code == 0, ran.stderr
    assert f"in http://root:***@{lite_server} collection" in ran.stderr, ran.stderr
    assert state_dir(job).dead_letters.exists()
    status = invoke("status", str(job), process=True, cwd=tmp_path, env=env)
    outputs = [p.stdout + p.stderr for p in (validate, ran, status)]
    assert validate.exit_code == status.exit_code == 0, outputs
    assert leaks(outputs, tmp_path, keep_out=(job,)) == []


def test_tls_client_against_a_plain_server(tmp_path: Path, lite_server: str,
                                           certs: dict[str, Path]) -> None:
    """A plain server refuses the TLS handshake: unavailable (exit 6) after the retries,
    in one line that says why."""
    job = make_job(tmp_path, DOCS, sink={"uri": f"http://{lite_server}", "retries": 1,
                                         "tls": {"ca_cert": str(certs["ca.pem"])}})
    ran = run(job, report=False, process=True)
    lines = error_lines(ran)
    assert ran.exit_code == 6 and len(lines) == 1, ran.stderr
    assert "Tls handshake failed" in lines[0] and "still failing after 1 attempts" in lines[0]


class _Refused(grpc.RpcError):
    """The gRPC status pymilvus wraps in its "Fail connecting" error."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize("cause, hint", [
    (_Refused(grpc.StatusCode.UNAUTHENTICATED, "auth check failure"),
     "the server refused the credentials"),
    (_Refused(grpc.StatusCode.UNAVAILABLE, "Custom verification check failed with error: "
              "UNAUTHENTICATED: Hostname Verification Check failed."),
     "the server's TLS certificate did not verify"),
])
def test_refusals_are_terminal(cause: grpc.RpcError, hint: str) -> None:
    """pymilvus reports these as a failed connect (code 2, otherwise retried)."""
    sink = MilvusSink(f"http://root:{URI_PASSWORD}@h:1", "c")

    def connect() -> None:
        raise MilvusException(code=2, message="Fail connecting to server on h:1") from cause

    with pytest.raises(SinkError) as e:
        sink._call("connect", connect)
    assert str(e.value).startswith("milvus http://root:***@h:1 collection 'c': connect: Fail "
                                   "connecting to server on h:1 (StatusCode."), e.value
    assert hint in str(e.value) and URI_PASSWORD not in str(e.value)


# ------------------------------------------------------- a real server with TLS and auth


@pytest.mark.server
def test_tls_and_authentication_against_a_real_server() -> None:
    """Mutual and one-way TLS, a refused token and a refused URI password, an untrusted
    certificate name, against Milvus 2.3 with ``authorizationEnabled`` in a network namespace."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    run_script_in_namespace(Path(__file__), OK_LINE)



SERVER_URI = "http://127.0.0.1:19530"


def _wait_tls(proc: subprocess.Popen[bytes], **kwargs: Any) -> float:
    """Seconds until the TLS server answers a logged-in request."""
    from pymilvus import MilvusClient

    start = time.monotonic()
    while time.monotonic() - start < 120:
        assert proc.poll() is None, f"milvus-server exited with {proc.returncode}"
        try:
            # dedicated: pymilvus shares connections by address and token, TLS settings aside
            client = MilvusClient(SERVER_URI, timeout=2, token="root:Milvus", secure=True,
                                  server_name=SERVER_NAME, dedicated=True, **kwargs)
            client.list_collections()
            client.close()
            return time.monotonic() - start
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    raise TimeoutError("the TLS server did not answer within 120 s")


def _refused(job: Path, env: dict[str, str], *needles: str) -> None:
    """The run stops with one line, exit 2 (a retried error would end in exit 6), and no
    secret anywhere."""
    ran = run(job, process=True, env=env)
    lines = error_lines(ran)
    assert ran.exit_code == 2 and len(lines) == 1, ran.stderr
    assert all(needle in lines[0] for needle in needles), lines
    report = ran.report
    assert report["status"] == "failed" and report["error"] in lines[0], report
    assert leaks([ran.stdout + ran.stderr], job.parent, keep_out=(job,)) == [], lines
    print(f"refused as expected: {lines[0]}", flush=True)


def _completed(job: Path, env: dict[str, str]) -> None:
    ran = run(job, process=True, env=env)
    assert ran.exit_code == 0, ran.stderr
    report = ran.report
    assert report["vectors_written"] == len(DOCS), report
    print(f"{job.parent.name}: {len(DOCS)} vectors written over TLS", flush=True)


def _mutual_tls_checks(root: Path, certs: dict[str, Path]) -> None:
    tls = {"ca_cert": str(certs["ca.pem"]), "client_cert": str(certs["client.pem"]),
           "client_key": str(certs["client.key"]), "server_name": SERVER_NAME}
    base = {"uri": SERVER_URI, "tls": tls, "token_env": "MILVUS_TOKEN", "retries": 3,
            "retry_base_delay_s": 0.1}
    ok = make_job(root / "mutual", DOCS, sink=base)
    _completed(ok, {"MILVUS_TOKEN": "root:Milvus"})
    wrong = make_job(root / "wrong-token", DOCS, sink=base)
    _refused(wrong, {"MILVUS_TOKEN": ENV_TOKEN}, f"error: milvus {SERVER_URI} collection",
             "the server refused the credentials")
    uri_password = make_job(root / "uri-password", DOCS, sink={
        **{k: v for k, v in base.items() if k != "token_env"},
        "uri": f"http://root:{URI_PASSWORD}@127.0.0.1:19530"})
    _refused(uri_password, {}, "error: milvus http://root:***@127.0.0.1:19530 collection",
             "the server refused the credentials")
    other_name = make_job(root / "other-name", DOCS, sink={
        **base, "tls": {**tls, "server_name": "other.test"}})
    _refused(other_name, {"MILVUS_TOKEN": "root:Milvus"},
             "the server's TLS certificate did not verify")


def _one_way_tls_checks(root: Path, certs: dict[str, Path]) -> None:
    ok = make_job(root / "one-way", DOCS, sink={
        "uri": "https://127.0.0.1:19530", "token": "root:Milvus",
        "tls": {"ca_cert": str(certs["ca.pem"]), "server_name": SERVER_NAME}})
    _completed(ok, {})


def _server_main() -> int:
    """Inside a fresh network namespace: for tlsMode 2 (mutual) and 1 (one-way), with
    authentication on, start a server, run the checks, stop it."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # the test's timeout: clean up
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with tempfile.TemporaryDirectory(prefix="milvus-tls-", ignore_cleanup_errors=True) as tmp:
        root = Path(tmp)
        certs = make_certs(root / "certs")
        for mode, checks in ((2, _mutual_tls_checks), (1, _one_way_tls_checks)):
            data = root / f"server-{mode}"
            data.mkdir()
            proc = start_server(data, options=[
                "--tls-mode", str(mode), "--server-pem-path", str(certs["server.pem"]),
                "--server-key-path", str(certs["server.key"]), "--ca-pem-path",
                str(certs["ca.pem"]), "--authorization-enabled", "1"])
            try:
                client_files = ({"ca_pem_path": str(certs["ca.pem"]),
                                 "client_pem_path": str(certs["client.pem"]),
                                 "client_key_path": str(certs["client.key"])} if mode == 2
                                else {"server_pem_path": str(certs["ca.pem"])})
                print(f"tlsMode {mode}: healthy after {_wait_tls(proc, **client_files):.1f} s",
                      flush=True)
                checks(root / f"jobs-{mode}", certs)
            except Exception:  # noqa: BLE001 - reported through the exit code and output
                traceback.print_exc()
                print_server_logs(data)
                return 1
            finally:
                stop_server(proc)
    print(OK_LINE, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_server_main())
