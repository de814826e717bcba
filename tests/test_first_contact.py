"""First contact: a user mistake, a signal or a broken machine ends in one line a user can
act on; long runs say how far they are; cron runs still say what matters. Real runs of the
command (child processes where signals, terminals or exit codes matter), real Milvus Lite.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import yaml
from helpers.cli import dead_letters, invoke, run, start
from helpers.jobs import demo_docs, make_job, state_dir
from reliability import record

DOCS = demo_docs(14)
FAST = {"sink": {"retry_base_delay_s": 0.01}}
CATEGORY = "first contact"


def errors(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_fixed_text_field_replans_instead_of_failing_forever(tmp_path: Path) -> None:
    job = make_job(tmp_path, DOCS, source={"text_field": "body"}, **FAST)
    done = run(job, process=True)
    [line] = errors(done.stderr)
    assert done.exit_code == 2 and "check source.text_field" in line, done.stderr
    job = make_job(tmp_path, DOCS, **FAST)
    done = run(job, process=True)
    assert done.exit_code == 0, done.stderr
    assert "source settings changed since it was planned (source.text_field)" in done.stderr
    assert done.report["docs_added"] == len(DOCS)
    record(CATEGORY, "wrong text_field, then fixed", "the ratio error names source.text_field; "
           "the fixed job plans again (no --restart)", f"{line[:100]}; then exit 0")


def test_duplicates_are_counted_once_in_the_dead_letter_ratio(tmp_path: Path) -> None:
    rows = DOCS[:14] + [dict(DOCS[i]) for i in range(6)]  # 20 rows, 6 duplicate ids
    job = make_job(tmp_path, rows, **FAST)
    done = run(job, process=True)
    [line] = errors(done.stderr)
    assert done.exit_code == 2 and "6 of 20 rows are dead letters (30%)" in line, line
    record(CATEGORY, "20 rows, 6 of them duplicate ids", "6 of 20 rows", line[:100])


def test_a_kill_between_commit_and_cleanup_reports_the_same_counts(tmp_path: Path) -> None:
    job = make_job(tmp_path, DOCS, **FAST)
    killed = run(job, process=True, fault="after_commit@1:kill")
    assert killed.exit_code == -signal.SIGKILL, killed.stderr
    done = run(job, process=True)
    assert done.exit_code == 0, done.stderr
    counts = done.report
    assert (counts["docs_added"], counts["docs_updated"]) == (len(DOCS), 0), counts
    record(CATEGORY, "killed between the sync-state commit and the cleanup",
           "the rerun reports the documents as added, not updated",
           f"added {counts['docs_added']}, updated {counts['docs_updated']}")


def _handler_installed(pid: int, signum: int) -> bool:
    """True once the process catches ``signum`` (its SigCgt mask, from /proc)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except OSError:
        pass
    return False


def test_a_signal_during_start_up_stops_with_a_message(tmp_path: Path) -> None:
    job = make_job(tmp_path, DOCS, **FAST)
    for signum, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        running = start(job, report=False)
        deadline = time.monotonic() + 60
        # SIGTERM's handler is the product's own (Python catches SIGINT from the start)
        while not _handler_installed(running.proc.pid, signal.SIGTERM) and \
                time.monotonic() < deadline:
            time.sleep(0.01)
        running.proc.send_signal(signum)
        stopped = running.finish(timeout=120)
        [line] = errors(stopped.stderr)
        assert stopped.exit_code == code and "resume" in line, stopped.stderr
        record(CATEGORY, f"{signal.Signals(signum).name} during start-up",
               f"exit {code}, one line", f"exit {stopped.exit_code}: {line[:90]}")


def test_report_and_prom_are_written_when_the_job_file_does_not_load(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("name: t\nsource: {path: x.jsonl}\nsink: {kind: milvus, uri: a.db}\n")
    last_night = tmp_path / "report.json"
    last_night.write_text(json.dumps({"status": "completed"}))
    done = run(job, "--report", str(last_night), "--prom", str(tmp_path / "t.prom"),
               report=False, process=True)
    [line] = errors(done.stderr)
    assert done.exit_code == 2 and "model" in line
    report = json.loads(last_night.read_text())
    assert report["status"] == "failed" and report["error"]
    prom = (tmp_path / "t.prom").read_text()
    assert 'embed_job_success{job="job"} 0' in prom
    assert "embed_job_last_run_timestamp_seconds" in prom
    record(CATEGORY, "--report/--prom with a job file that does not load",
           "both written: status failed, success 0, a timestamp", line[:90])


def test_progress_off_a_terminal_is_plain_lines(tmp_path: Path) -> None:
    job = make_job(tmp_path, DOCS, **FAST)
    done = run(job, "--progress-every", "1", quiet=False, process=True)
    assert done.exit_code == 0, done.stderr
    assert "\r" not in done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("embed t: ")]
    assert lines and "tokens/s" in lines[-1] and "%" in lines[-1], done.stderr
    record(CATEGORY, "progress with stderr not a terminal",
           "a plain line every --progress-every seconds, no \\r frames", lines[-1][:90])


def test_quiet_runs_still_say_dead_letters_and_deletions_and_json_logs(tmp_path: Path) -> None:
    rows = DOCS[:12] + [{"id": "empty", "text": " "}]
    job = make_job(tmp_path, rows, sync={"delete_missing": True}, **FAST)
    done = run(job, process=True)
    assert done.exit_code == 0 and "warning: 1 new dead letters" in done.stderr, done.stderr
    job = make_job(tmp_path, DOCS[:10], sync={"delete_missing": True}, **FAST)
    done = run(job, "--log-format", "json", process=True)
    assert done.exit_code == 0, done.stderr
    assert not any(ln.startswith(("warning:", "error:")) for ln in done.stderr.splitlines())
    lines = [json.loads(ln) for ln in done.stderr.splitlines() if ln.startswith("{")]
    assert any(ln["level"] == "warning" and "2 documents deleted" in ln["message"]
               for ln in lines), lines
    record(CATEGORY, "--quiet run that dead-letters and deletes; --log-format json",
           "one warning line each; every json line parses", f"{len(lines)} json lines")


def test_an_id_longer_than_milvus_allows_is_a_dead_letter(tmp_path: Path) -> None:
    rows = DOCS[:5] + [{"id": "é" * 600, "text": "a perfectly good text"}]  # 1,200 bytes
    job = make_job(tmp_path, rows, max_dead_letter_ratio=0.5, **FAST)
    done = run(job, process=True)
    assert done.exit_code == 0, done.stderr
    letters = dead_letters(job)
    assert len(letters) == 1 and "1200 bytes" in letters[0]["reason"], letters
    record(CATEGORY, "a 1,200-byte doc id into Milvus (VARCHAR 1024)",
           "dead-lettered at planning; the job completes", letters[0]["reason"][:90])


def test_broken_state_and_directories_give_one_line(tmp_path: Path) -> None:
    job = make_job(tmp_path, DOCS[:4], **FAST)
    assert run(job, process=True).exit_code == 0
    sync_db = state_dir(job).sync_db
    sync_db.write_bytes(b"not a database" * 100)
    for done, what in ((run(job, process=True), "run --quiet"),
                       (run(job, "--dry-run", quiet=False, process=True), "run --dry-run"),
                       (invoke("status", str(job), process=True), "status")):
        [line] = errors(done.stderr)
        assert done.exit_code == 2 and sync_db.name in line, (what, done.stderr)
    (tmp_path / "afile").write_text("x")
    spec = yaml.safe_load(job.read_text())
    job.write_text(yaml.safe_dump({**spec, "checkpoint_dir": "afile/state"}))
    done = run(job, process=True)
    [line] = errors(done.stderr)
    assert done.exit_code == 2 and "afile" in line, done.stderr
    record(CATEGORY, "corrupt sync.sqlite (run, --dry-run, status); checkpoint_dir under a file",
           "one line each, exit 2", line[:90])


def test_a_trial_run_says_it_did_not_publish(tmp_path: Path) -> None:
    job = make_job(tmp_path, DOCS, **FAST)
    done = run(job, "--limit", "3", process=True)
    assert done.exit_code == 0 and "trial run (--limit 3)" in done.stderr, done.stderr
    assert "not published" in done.stderr
    status = invoke("status", str(job), "--json", process=True)
    state = json.loads(status.stdout)
    assert state["plan_complete"] is False and state["percent_done"] is None, state
