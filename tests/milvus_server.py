"""A real Milvus server for the sink tests, and the scenario both Lite and the server must pass.

The PyPI ``milvus`` package's ``milvus-server`` binds every interface, so it only ever runs
inside a fresh network namespace. The test process has to share that namespace to reach it,
so the pytest test runs this file as a script under ``unshare -n``:

    unshare -n python tests/milvus_server.py

which brings up ``lo``, starts the server on a throwaway data dir, waits until it answers,
runs :func:`run_scenario` against it, stops it by process group and exits 0 (or 1).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from helpers.sinks import DIM, ODD_DOC, make_batch, milvus_pks, milvus_query, milvus_search  # noqa: E402

from pipeline.errors import SinkError  # noqa: E402

if TYPE_CHECKING:
    from pipeline.sinks.milvus.sink import MilvusSink

PORT = 19530
LONG_TEXT = "é" * 40_000  # 80,000 UTF-8 bytes: over VARCHAR(65535) on a server
OK_LINE = "milvus server scenario ok"


def run_scenario(make_sink: Callable[[], MilvusSink]) -> None:
    """Create, write (one batch twice, as after a crash), count, read back, search, forget
    documents, reopen; raises AssertionError on the first difference."""
    b0, b1 = make_batch("b0", 0, 10), make_batch("b1", 10, 10)
    b1.texts[0] = LONG_TEXT  # type: ignore[index]
    sink = make_sink()
    sink.on_write_start(DIM)
    assert [sink.write(b) for b in (b0, b1, b0)] == [["b0"], ["b1"], ["b0"]]
    assert sink.count() == 20, sink.count()  # Strong read, before any flush
    assert sink.on_write_complete() == []
    assert milvus_pks(sink) == set(b0.pks + b1.pks)

    stored = next(milvus_query(sink, f'pk == "{b1.pks[0]}"', fields=("pk", "text", "metadata")))
    text = stored["text"]
    assert len(text.encode()) <= 65535 and LONG_TEXT.startswith(text), len(text.encode())
    assert stored["metadata"] == b1.metadata[0], stored["metadata"]

    hits = milvus_search(sink, b1.vectors[3], limit=3)
    assert (hits[0][0], hits[0][1]) == (b1.pks[3], b1.doc_ids[3]), hits
    assert abs(hits[0][2] - 1.0) < 1e-4, hits

    assert sink.forget(0, ["doc0", ODD_DOC, "no-such-doc"]) == []
    expected = {pk for pk, doc in zip(b0.pks + b1.pks, b0.doc_ids + b1.doc_ids)
                if doc not in ("doc0", ODD_DOC)}
    assert sink.count() == len(expected) == 14, sink.count()
    assert milvus_pks(sink) == expected
    sink.close()
    sink.close()

    again = make_sink()
    again.on_write_start(DIM)
    assert again.count() == 14
    again.close()
    wrong = make_sink()
    try:
        wrong.on_write_start(DIM // 2)
    except SinkError as e:
        assert f"vector dimension {DIM} != job dimension {DIM // 2}" in str(e), e
    else:
        raise AssertionError("a dimension mismatch was accepted")
    finally:
        wrong.close()


def milvus_server_bin() -> str | None:
    """The ``milvus-server`` script: on PATH, or beside this interpreter (an unactivated venv)."""
    beside = Path(sys.executable).parent / "milvus-server"
    return shutil.which("milvus-server") or (str(beside) if beside.exists() else None)


def start_server(data_dir: Path, port: int = PORT,
                 options: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """Start the server in its own process group, logging into ``data_dir``; ``options``:
    more ``milvus-server`` options (``--tls-mode 1``, ``--authorization-enabled 1``...)."""
    exe = milvus_server_bin()
    assert exe, "milvus-server is not installed"
    with open(data_dir / "server.log", "wb") as log:
        return subprocess.Popen([exe, "--data", str(data_dir), "--proxy-port", str(port),
                                 *options],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(proc: subprocess.Popen[bytes], uri: str, timeout: float = 90.0) -> float:
    """Seconds until the server answers a request; raises if it exits or takes too long."""
    from pymilvus import MilvusClient

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"milvus-server exited with {proc.returncode}")
        try:
            client = MilvusClient(uri, timeout=2)
            client.list_collections()
            client.close()
            return time.monotonic() - start
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.3)
    raise TimeoutError(f"milvus-server not healthy after {timeout:.0f} s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT lets the wrapper stop its ``milvus`` child; then SIGKILL whatever is left of the
    group (a SIGTERMed server can hang in shutdown for minutes)."""
    for sig, wait in ((signal.SIGINT, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def run_script_in_namespace(script: Path, ok_line: str, timeout: float = 400.0) -> str:
    """Run a server script under ``unshare -n`` from a test (skipping where that cannot
    work); fail unless it exits 0 after printing ``ok_line``. Returns its output."""
    import pytest

    if milvus_server_bin() is None:
        pytest.skip("milvus-server is not installed (pip install milvus)")
    try:
        usable = shutil.which("unshare") is not None and subprocess.run(
            ["unshare", "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        usable = False
    if not usable:
        pytest.skip("`unshare -n` is not permitted here (needs root or user namespaces)")
    proc = subprocess.Popen(["unshare", "-n", sys.executable, str(script)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the scripts stop their servers on SIGTERM
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"{script.name} timed out:\n{out[-4000:]}")
    assert proc.returncode == 0 and ok_line in out, out[-6000:]
    return out


def print_server_logs(data_dir: Path) -> None:
    """The ends of a failed server's logs, for the test's output."""
    for log in (data_dir / "server.log", data_dir / "logs" / "milvus-stdout.log"):
        if log.exists():
            print(f"--- {log.name}:", log.read_text(errors="replace")[-2000:])


def serve_in_namespace(scenario: Callable[[str, Path], None], ok_line: str) -> int:
    """The body of a server script run under ``unshare -n``: bring up lo, start a server on a
    throwaway data dir, run ``scenario(uri, data_dir)``, stop it by process group; 0 after
    printing ``ok_line``, 1 with the traceback and the server's logs."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # the test's timeout: clean up
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    uri = f"http://127.0.0.1:{PORT}"
    with tempfile.TemporaryDirectory(prefix="milvus-server-", ignore_cleanup_errors=True) as tmp:
        proc = start_server(Path(tmp))
        try:
            print(f"healthy after {wait_healthy(proc, uri):.1f} s", flush=True)
            t = time.monotonic()
            scenario(uri, Path(tmp))
            print(f"scenario took {time.monotonic() - t:.1f} s", flush=True)
        except Exception:  # noqa: BLE001 - reported through the exit code and output
            traceback.print_exc()
            print_server_logs(Path(tmp))
            return 1
        finally:
            stop_server(proc)
    print(ok_line, flush=True)
    return 0


@contextmanager
def lite_server(data_dir: Path) -> Iterator[str]:
    """A plain ``milvus-lite server`` on a free localhost port; yields its http:// URI."""
    with lite_server_process(data_dir) as (uri, _):
        yield uri


@contextmanager
def lite_server_process(data_dir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``lite_server``'s URI and its process (to stop or signal it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}", timeout=30)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.send_signal(signal.SIGCONT)  # a stopped server cannot act on SIGTERM
        proc.terminate()
        proc.wait(timeout=15)


def main() -> int:
    """The sink scenario against the server (see the module docstring)."""
    from pipeline.sinks.milvus.sink import MilvusSink

    return serve_in_namespace(lambda uri, _: run_scenario(lambda: MilvusSink(uri, "scenario")),
                              OK_LINE)


if __name__ == "__main__":
    sys.exit(main())
