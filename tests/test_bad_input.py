"""Bad input: every malformed input ends in a one-line error naming the place, or a dead letter.

Each case runs the real CLI (Click's runner, or a real process where stderr matters) on real
files: a user error exits 2 with exactly one ``error: `` line and no traceback, and nothing is
published; a malformed row under ``on_bad_row: dead_letter`` lands in the dead-letter file with
its ``file:line`` / ``file#row`` and reason while the good rows reach the store. Row-level cases
share one run per format. Every case adds a row to docs/reliability.md (see reliability.py).
"""

from __future__ import annotations

import gzip
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.cli import Result, dead_letters, invoke, run
from helpers.jobs import demo_docs, make_job, state_dir
from helpers.rows import parquet_rows, published_version
from reliability import record
from transformers import AutoTokenizer

PARQUET_SINK = {"kind": "parquet", "path": "v"}
MAX_TOKENS = 128  # make_job's chunking.max_tokens


# ----------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Run:
    """One CLI run of ``job``: what it printed, and what it left behind."""

    job: Path
    exit_code: int
    output: str
    exception: BaseException | None = None
    report_file: Path | None = None

    @classmethod
    def of(cls, job: Path, done: Result) -> Run:
        return cls(job, done.exit_code, done.output, done.exception, done.report_file)

    @property
    def dir(self) -> Path:
        return self.job.parent

    @property
    def lines(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.strip()]

    @property
    def report(self) -> dict[str, Any]:
        path = self.report_file
        return json.loads(path.read_text()) if path and path.exists() else {}

    @property
    def dead_letters(self) -> list[dict[str, Any]]:
        return dead_letters(self.job)

    @property
    def published(self) -> bool:
        return published_version(self.dir / PARQUET_SINK["path"]) is not None

    def short(self, text: str) -> str:
        """``text`` with this run's directory taken out of paths, for the table."""
        for d in {str(self.dir.resolve()), str(self.dir)}:
            text = text.replace(d + "/", "").replace(d, ".")
        return text

    def observed(self) -> str:
        """What happened, in a line, for the table."""
        if self.exception is not None:
            first = (str(self.exception).splitlines() or [""])[0]
            return self.short(f"exit 1, traceback: {type(self.exception).__name__}: {first}")
        if self.exit_code == 0:
            return (f"exit 0, report: {self.report.get('docs', '?')} docs, "
                    f"{self.report.get('vectors_written', '?')} vectors")
        first = self.lines[0] if self.lines else "(no output)"
        return self.short(f"exit {self.exit_code}: {first}")


def run_cli(job: Path, *args: str) -> Run:
    """``embed-job run JOB --quiet --report DIR/report.json`` in this process; a crash is
    kept, for the table."""
    return Run.of(job, run(job, *args, catch=True))


def run_process(job: Path) -> Run:
    """The same command in a real process, so stray warnings or tracebacks on stderr count."""
    return Run.of(job, run(job, process=True))


def expect_error(run: Run, category: str, case: str, *needles: str) -> str:
    """Record the case, then assert: exit 2, one ``error:`` line holding every needle (paths
    relative to the run's directory), no traceback, nothing published. Returns the line."""
    record(category, case, "exit 2, one line: " + " … ".join(needles), run.observed())
    assert run.exception is None, f"crashed: {run.exception!r}"
    assert "Traceback" not in run.output, run.output
    assert run.exit_code == 2, run.output
    assert len(run.lines) == 1 and run.lines[0].startswith("error: "), run.output
    line = run.short(run.lines[0])
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert not run.published, "a failed run published its target"
    return line


def stored_chunks(run: Run) -> dict[str, list[tuple[int, str]]]:
    """doc id -> [(chunk index, text)] of the published Parquet version, read with pyarrow."""
    root = run.dir / PARQUET_SINK["path"]
    rows = parquet_rows(root)  # also fails on a duplicate primary key
    texts: dict[str, str] = {}
    for f in sorted(published_version(root).glob("*.parquet")):
        t = pq.read_table(f, columns=["pk", "text"])
        texts.update(zip(t["pk"].to_pylist(), t["text"].to_pylist()))
    docs: dict[str, list[tuple[int, str]]] = {}
    for pk, row in rows.items():
        docs.setdefault(row["doc_id"], []).append((row["chunk_index"], texts[pk]))
    return {doc: sorted(chunks) for doc, chunks in docs.items()}


def write_parquet(path: Path, columns: dict[str, Any], row_group_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def short_docs(n: int, start: int = 0) -> list[dict[str, Any]]:
    """``n`` demo documents cut to a few hundred characters (one chunk each, quick to embed)."""
    return [{**d, "text": d["text"][:300]} for d in demo_docs(start + n)[start:]]


# ------------------------------------------------------------- JSONL rows, one shared run


@dataclass(frozen=True)
class Line:
    """One line of the shared JSONL corpus and what must become of it."""

    case: str
    raw: bytes  # without the newline
    doc_id: str | None  # the id stored, or the id the dead letter carries
    reason: str | None = None  # dead-letter reason (a substring); None: stored
    skipped: bool = False  # neither stored nor dead-lettered (a blank line)


def _j(row: dict[str, Any]) -> bytes:
    return json.dumps(row, ensure_ascii=False).encode()


_GOOD = short_docs(4)
_LONG_TEXT = "\n\n".join(d["text"] for d in demo_docs(30))[:20_000]
LINES: list[Line] = [
    Line("BOM at file start (accepted)", b"\xef\xbb\xbf" + _j({**_GOOD[0], "id": "bom"}), "bom"),
    Line("good row", _j({**_GOOD[1], "id": "good-1"}), "good-1"),
    Line("invalid JSON", b'{"id": "broken", "text": "no closing quote', None, "invalid JSON"),
    Line("non-object line (a JSON list)", b'["a list", 1]', None,
         "not a JSON object (got list)"),
    Line("invalid UTF-8 bytes", b'{"id": "latin1", "text": "caf\xe9 cr\xe8me"}', None,
         "invalid UTF-8 (byte 0xe9"),
    Line("missing text field", _j({"id": "no-text", "title": "t"}), "no-text",
         "field 'text': missing"),
    Line("null text", _j({"id": "null-text", "text": None}), "null-text", "field 'text': null"),
    Line("non-string text (int)", _j({"id": "int-text", "text": 12345}), "int-text",
         "field 'text': must be a string (got int)"),
    Line("NaN as text", b'{"id": "nan-text", "text": NaN}', "nan-text",
         "field 'text': must be a string (got float)"),
    Line("empty (whitespace-only) text", _j({"id": "blank-text", "text": " \n\t "}), "blank-text",
         "field 'text': empty"),
    Line("text with no tokens (zero-width only)", _j({"id": "zw-text", "text": "\u200b\u200b"}),
         "zw-text", "empty text after tokenization"),
    Line("lone surrogate in text", b'{"id": "surrogate", "text": "bad \\ud800 text"}', "surrogate",
         "not valid Unicode"),
    Line("null id", _j({"id": None, "text": "has text"}), None, "field 'id': null"),
    Line("missing id", _j({"text": "has text"}), None, "field 'id': missing"),
    Line("boolean id", _j({"id": True, "text": "has text"}), None,
         "field 'id': must be a string or an integer (got bool)"),
    Line("float id", _j({"id": 1.5, "text": "has text"}), None,
         "field 'id': must be a string or an integer (got float)"),
    Line("int id (accepted as a string)", _j({**_GOOD[2], "id": 42}), "42"),
    Line("duplicate id (second occurrence)", _j({"id": "good-1", "text": "another text"}), "good-1",
         "duplicate id, first seen at corpus.jsonl:2"),
    Line("whitespace-only line (skipped)", b"   ", None, skipped=True),
    Line("CRLF line ending (accepted)", _j({**_GOOD[3], "id": "crlf"}) + b"\r", "crlf"),
    Line("long single line (20 kB, split)", _j({"id": "long", "text": _LONG_TEXT}), "long"),
]
LINE_NO = {line.case: n for n, line in enumerate(LINES, 1)}


@pytest.fixture(scope="module")
def jsonl_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """All of LINES in one corpus.jsonl, run once with on_bad_row: dead_letter (and no
    dead-letter ratio limit: the file is mostly bad on purpose)."""
    d = tmp_path_factory.mktemp("jsonl-rows")
    job = make_job(d, [], sink=PARQUET_SINK, max_dead_letter_ratio=None)
    (d / "corpus.jsonl").write_bytes(b"".join(line.raw + b"\n" for line in LINES))
    return run_cli(job)


def test_jsonl_rows_run_completes(jsonl_run: Run) -> None:
    """The run as a whole: exit 0; exactly the bad lines dead-lettered, the good ones stored."""
    dead = {d["source"] for d in jsonl_run.dead_letters}
    expected_dead = {f"{jsonl_run.dir / 'corpus.jsonl'}:{LINE_NO[x.case]}"
                     for x in LINES if x.reason}
    stored = set(stored_chunks(jsonl_run)) if jsonl_run.published else set()
    record("JSONL rows", "whole file: bad rows mixed with good ones",
           f"exit 0, {len(expected_dead)} dead letters, "
           f"{sum(1 for x in LINES if not x.reason and not x.skipped)} docs stored",
           f"{jsonl_run.observed()}, {len(dead)} dead letters, {len(stored)} docs stored")
    assert jsonl_run.exception is None and jsonl_run.exit_code == 0, jsonl_run.output
    assert jsonl_run.report["status"] == "completed"
    assert dead == expected_dead
    assert stored == {x.doc_id for x in LINES if not x.reason and not x.skipped}


@pytest.mark.parametrize("case", [line.case for line in LINES])
def test_jsonl_row(jsonl_run: Run, case: str) -> None:
    """One line's fate: a dead letter naming file:line with the reason, or a stored document."""
    line = LINES[LINE_NO[case] - 1]
    source = f"{jsonl_run.dir / 'corpus.jsonl'}:{LINE_NO[case]}"
    letters = [d for d in jsonl_run.dead_letters if d["source"] == source]
    stored = stored_chunks(jsonl_run) if jsonl_run.published else {}
    if letters:
        observed = "dead letter: " + jsonl_run.short(letters[0]["reason"])
    elif line.doc_id in stored and not line.reason:
        observed = f"stored as id {line.doc_id!r} ({len(stored[line.doc_id])} chunks)"
    else:
        observed = "skipped (neither stored nor dead-lettered)"
    expected = (f"dead letter: {line.reason}" if line.reason else "skipped (neither stored "
                "nor dead-lettered)" if line.skipped else f"stored as id {line.doc_id!r}")
    record("JSONL rows (on_bad_row: dead_letter)", case, expected, observed)
    if line.reason:
        assert len(letters) == 1, letters
        assert line.reason in jsonl_run.short(letters[0]["reason"])
        assert letters[0]["doc_id"] == line.doc_id
    else:
        assert letters == []
        if not line.skipped:
            assert line.doc_id in stored


def test_jsonl_long_line_chunks_fit(jsonl_run: Run, minilm_dir: Path) -> None:
    """The 20 kB one-line document is split into consecutive chunks the model takes whole."""
    chunks = stored_chunks(jsonl_run)["long"]
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    sizes = [len(tokenizer(text)["input_ids"]) for _, text in chunks]
    assert [i for i, _ in chunks] == list(range(len(chunks))) and len(chunks) > 20
    assert max(sizes) <= MAX_TOKENS
    assert chunks[0][1] == _LONG_TEXT[:len(chunks[0][1])]


# ------------------------------------------------------------ JSONL, file-level and policy

ERROR_MODE_CASES = ["invalid JSON", "invalid UTF-8 bytes", "missing text field", "null id",
                    "non-string text (int)"]


@pytest.mark.parametrize("case", ERROR_MODE_CASES)
def test_jsonl_on_bad_row_error_stops(tmp_path: Path, case: str) -> None:
    """on_bad_row: error stops at the bad line with one line naming file:line and the field."""
    line = LINES[LINE_NO[case] - 1]
    job = make_job(tmp_path, [], sink=PARQUET_SINK, source={"on_bad_row": "error"})
    (tmp_path / "corpus.jsonl").write_bytes(LINES[1].raw + b"\n" + line.raw + b"\n")
    expect_error(run_cli(job), "JSONL rows (on_bad_row: error)", case,
                 f"error: corpus.jsonl:2: {line.reason}")


def test_jsonl_duplicate_id_on_bad_row_error_stops(tmp_path: Path) -> None:
    """A duplicate id is a malformed row too: on_bad_row: error must stop on it (not merely
    trip the dead-letter ratio, which is off here)."""
    job = make_job(tmp_path, [], sink=PARQUET_SINK, source={"on_bad_row": "error"},
                   max_dead_letter_ratio=None)
    dup = LINES[LINE_NO["duplicate id (second occurrence)"] - 1]
    (tmp_path / "corpus.jsonl").write_bytes(LINES[1].raw + b"\n" + dup.raw + b"\n")
    expect_error(run_cli(job), "JSONL rows (on_bad_row: error)", "duplicate id",
                 "corpus.jsonl:2", "duplicate id")


def test_empty_jsonl_file_completes_with_zero_docs(tmp_path: Path) -> None:
    """A 0-byte corpus is not an error: the run completes and says it embedded nothing."""
    job = make_job(tmp_path, [], sink=PARQUET_SINK)
    (tmp_path / "corpus.jsonl").write_bytes(b"")
    run = run_cli(job)
    record("JSONL files", "empty file (0 bytes)", "exit 0, report says 0 docs", run.observed())
    assert run.exception is None and run.exit_code == 0, run.output
    assert run.report["status"] == "completed" and run.report["docs"] == 0
    assert run.report["vectors_written"] == 0 and run.dead_letters == []


@pytest.mark.parametrize("damage", ["truncated", "not gzip"])
def test_corrupt_jsonl_gz_is_a_file_error(tmp_path: Path, damage: str) -> None:
    """A .jsonl.gz cut short or not gzip at all stops the run naming the file."""
    job = make_job(tmp_path, [], sink=PARQUET_SINK, source={"path": "corpus.jsonl.gz"})
    data = gzip.compress(b"".join(_j({**d, "id": f"gz-{i}"}) + b"\n"
                                  for i, d in enumerate(short_docs(40))))
    (tmp_path / "corpus.jsonl.gz").write_bytes(
        data[:len(data) // 2] if damage == "truncated" else b"plain text, not gzip\n")
    expect_error(run_cli(job), "JSONL files", f".jsonl.gz {damage}",
                 "error: corpus.jsonl.gz: cannot read: ")


@pytest.mark.parametrize("policy", ["skip", "truncate"])
def test_huge_single_line(tmp_path: Path, policy: str) -> None:
    """A 3 MB document on one line is read and tokenized whole, then handled by over_length.

    (Under the default ``split`` it becomes ~7,000 chunks: correct, but minutes of CPU.)
    """
    base = "\n\n".join(d["text"] for d in demo_docs(94))
    huge = (base * (3_000_000 // len(base) + 1))[:3_000_000]
    job = make_job(tmp_path, [{"id": "huge", "text": huge}, {**short_docs(1)[0], "id": "small"}],
                   sink=PARQUET_SINK, chunking={"over_length": policy},
                   max_dead_letter_ratio=None)
    run = run_cli(job)
    letters = run.dead_letters
    chunks = stored_chunks(run) if run.published else {}
    observed = (f"{run.observed()}; " + (f"dead letter: {letters[0]['reason']}" if letters else
                                         f"huge stored as {len(chunks.get('huge', []))} chunk(s)"))
    fate = "dead-lettered (over length)" if policy == "skip" else "stored as 1 chunk"
    record("JSONL files", f"3 MB single line, over_length: {policy}", f"exit 0, huge doc {fate}",
           observed)
    assert run.exception is None and run.exit_code == 0, run.output
    assert "small" in chunks
    if policy == "skip":
        assert [(d["doc_id"], d["source"]) for d in letters] == [
            ("huge", f"{tmp_path / 'corpus.jsonl'}:1")]
        reason = letters[0]["reason"]
        assert reason.startswith("over length: ") and f"max {MAX_TOKENS}" in reason
        assert "huge" not in chunks
    else:
        assert letters == [] and [i for i, _ in chunks["huge"]] == [0]
        assert huge.startswith(chunks["huge"][0][1])


# ------------------------------------------------------------------- Parquet, one shared run


@pytest.fixture(scope="module")
def parquet_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Six Parquet files with different schemas and bad rows, run once (dead_letter, no
    dead-letter ratio limit)."""
    d = tmp_path_factory.mktemp("parquet-rows")
    texts = [x["text"] for x in short_docs(8)]
    data = d / "data"
    write_parquet(data / "a.parquet", {
        "id": ["pq-1", "pq-2", "pq-3", "pq-null-text", "pq-empty", None, "1"],
        "text": [texts[0], texts[1], texts[2], None, "  ", texts[3], texts[4]],
        "title": ["A", "B", "C", "D", "E", "F", "G"]})
    # mixed schema: int64 ids, an extra column, no title column
    write_parquet(data / "b.parquet", {"id": pa.array([1, 2, 3], pa.int64()),
                                       "text": texts[5:8], "lang": ["en"] * 3})
    write_parquet(data / "c.parquet", {"id": ["int-text-0", "int-text-1"],
                                       "text": pa.array([7, 8], pa.int64())})
    write_parquet(data / "d.parquet", {"id": pa.array([1.5], pa.float64()), "text": ["float id"]})
    write_parquet(data / "e.parquet", {"id": pa.array([], pa.string()),
                                       "text": pa.array([], pa.string())})
    # large_string and dictionary-encoded columns, title as an int
    write_parquet(data / "f.parquet", {
        "id": pa.array(["f-0"], pa.large_string()),
        "text": pa.array([texts[0] + " (f)"]).dictionary_encode(), "title": [5]})
    job = make_job(d, [], sink=PARQUET_SINK, source={"path": "data/*.parquet"},
                   max_dead_letter_ratio=None)
    return run_cli(job)


PARQUET_ROWS: list[tuple[str, str, str | None, str | None]] = [
    # (case, file#row, the id stored or dead-lettered, dead-letter reason; None: stored)
    ("good row (string id)", "a.parquet#0", "pq-1", None),
    ("null text", "a.parquet#3", "pq-null-text", "field 'text': null"),
    ("empty text", "a.parquet#4", "pq-empty", "field 'text': empty"),
    ("null id", "a.parquet#5", None, "field 'id': null"),
    ("mixed schemas: int64 id column, extra column, no title (accepted)", "b.parquet#1", "2",
     None),
    ("mixed schemas: int id 1 vs string id '1' in another file (duplicate)", "b.parquet#0", "1",
     "duplicate id, first seen at data/a.parquet#6"),
    ("text column of the wrong type (int64)", "c.parquet#0", "int-text-0",
     "field 'text': must be a string (got int)"),
    ("id column of floats", "d.parquet#0", None,
     "field 'id': must be a string or an integer (got float)"),
    ("large_string / dictionary-encoded columns (accepted)", "f.parquet#0", "f-0", None),
]
PARQUET_STORED = {"pq-1", "pq-2", "pq-3", "1", "2", "3", "f-0"}


def test_parquet_rows_run_completes(parquet_run: Run) -> None:
    """Exit 0; the dead letters are exactly the bad rows; every good row of every file stored."""
    dead = sorted(parquet_run.short(d["source"]) for d in parquet_run.dead_letters)
    stored = set(stored_chunks(parquet_run)) if parquet_run.published else set()
    record("Parquet rows", "six files, mixed schemas, bad rows, an empty file",
           f"exit 0, 7 dead letters, {len(PARQUET_STORED)} docs stored",
           f"{parquet_run.observed()}, {len(dead)} dead letters, {len(stored)} docs stored")
    assert parquet_run.exception is None and parquet_run.exit_code == 0, parquet_run.output
    assert dead == ["data/a.parquet#3", "data/a.parquet#4", "data/a.parquet#5", "data/b.parquet#0",
                    "data/c.parquet#0", "data/c.parquet#1", "data/d.parquet#0"]
    assert stored == PARQUET_STORED


@pytest.mark.parametrize("case,where,doc_id,reason", PARQUET_ROWS,
                         ids=[row[0] for row in PARQUET_ROWS])
def test_parquet_row(parquet_run: Run, case: str, where: str, doc_id: str | None,
                     reason: str | None) -> None:
    """One row's fate: a dead letter naming file#row with the reason, or a stored document."""
    source = f"{parquet_run.dir / 'data' / where}"
    letters = [d for d in parquet_run.dead_letters if d["source"] == source]
    stored = stored_chunks(parquet_run) if parquet_run.published else {}
    observed = ("dead letter: " + parquet_run.short(letters[0]["reason"]) if letters
                else f"stored as id {doc_id!r}" if doc_id in stored else "not stored")
    record("Parquet rows (on_bad_row: dead_letter)", case,
           f"dead letter: {reason}" if reason else f"stored as id {doc_id!r}", observed)
    if reason:
        assert len(letters) == 1 and reason in parquet_run.short(letters[0]["reason"])
        assert letters[0]["doc_id"] == doc_id
    else:
        assert letters == [] and doc_id in stored


def _truncated(d: Path) -> None:
    write_parquet(d / "data" / "a.parquet", {"id": [f"t{i}" for i in range(200)],
                                             "text": ["some text"] * 200})
    path = d / "data" / "a.parquet"
    path.write_bytes(path.read_bytes()[:-100])


def _corrupt_page(d: Path) -> None:
    """Zeros over the middle of the file: the footer and the first row group are intact."""
    path = write_parquet(d / "data" / "a.parquet", {
        "id": [f"t{i}" for i in range(3000)],
        "text": [f"some text number {i} " * 5 for i in range(3000)]}, row_group_size=1000)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 200] = bytes(200)
    path.write_bytes(bytes(data))


def _not_parquet(d: Path) -> None:
    (d / "data").mkdir()
    (d / "data" / "a.parquet").write_text('{"id": "x", "text": "JSON named .parquet"}\n')


def _no_text_column(d: Path) -> None:
    write_parquet(d / "data" / "a.parquet", {"id": ["x"], "body": ["text under another name"]})


def _second_file_without_text(d: Path) -> None:
    write_parquet(d / "data" / "a.parquet", {"id": ["x"], "text": ["fine"]})
    write_parquet(d / "data" / "b.parquet", {"id": ["y"], "content": ["no text column"]})


PARQUET_FILE_CASES = {
    "truncated file": (_truncated, ["error: data/a.parquet: not a readable Parquet file"]),
    "corrupt data page, footer intact": (
        _corrupt_page, ["error: data/a.parquet: not a readable Parquet file"]),
    "non-Parquet bytes named .parquet": (
        _not_parquet, ["error: data/a.parquet: not a readable Parquet file"]),
    "missing text column": (_no_text_column, ["error: data/a.parquet: column 'text' not found"]),
    "mixed schemas: second file lacks the text column": (
        _second_file_without_text, ["error: data/b.parquet: column 'text' not found"]),
}


@pytest.mark.parametrize("case", PARQUET_FILE_CASES)
def test_parquet_file_error(tmp_path: Path, case: str) -> None:
    """A Parquet file that cannot be read as a source stops the run naming the file."""
    build, needles = PARQUET_FILE_CASES[case]
    build(tmp_path)
    job = make_job(tmp_path, [], sink=PARQUET_SINK, source={"path": "data/*.parquet"})
    expect_error(run_cli(job), "Parquet files", case, *needles)


def test_truncated_parquet_in_a_real_process(tmp_path: Path) -> None:
    """Through a real ``python -m pipeline.cli`` process: stderr is the one error line."""
    _truncated(tmp_path)
    job = make_job(tmp_path, [], sink=PARQUET_SINK, source={"path": "data/*.parquet"})
    expect_error(run_process(job), "Parquet files", "truncated file (real process, stderr)",
                 "error: data/a.parquet: not a readable Parquet file")


def test_parquet_on_bad_row_error_stops(tmp_path: Path) -> None:
    """on_bad_row: error names file#row and the field."""
    write_parquet(tmp_path / "data" / "a.parquet", {"id": ["ok", "bad"], "text": ["fine", None]})
    job = make_job(tmp_path, [], sink=PARQUET_SINK,
                   source={"path": "data/*.parquet", "on_bad_row": "error"})
    expect_error(run_cli(job), "Parquet rows (on_bad_row: error)", "null text",
                 "error: data/a.parquet#1: field 'text': null")


def test_whole_file_of_wrong_type_trips_the_dead_letter_ratio(tmp_path: Path) -> None:
    """A file whose text column is all ints is not a silent success: past
    max_dead_letter_ratio (default 10%) the run stops with exit 2 and publishes nothing."""
    write_parquet(tmp_path / "data" / "good.parquet", {
        "id": [d["id"] for d in short_docs(20)], "text": [d["text"][:80] for d in short_docs(20)]})
    write_parquet(tmp_path / "data" / "ints.parquet", {
        "id": [f"n{i}" for i in range(25)], "text": pa.array(range(25), pa.int64())})
    job = make_job(tmp_path, [], sink=PARQUET_SINK, source={"path": "data/*.parquet"})
    run = run_cli(job)
    expect_error(run, "Parquet files", "whole file with an int text column (25 of 45 rows)",
                 "error: 25 of 45 rows are dead letters", "max_dead_letter_ratio 10%",
                 str(state_dir(job).dead_letters.relative_to(tmp_path)))
    assert len(run.dead_letters) == 25


def test_report_of_a_run_that_fails_early_says_failed(tmp_path: Path) -> None:
    """cron reads --report: a run stopped by bad input must not look like one still going."""
    job = make_job(tmp_path, short_docs(1), sink=PARQUET_SINK, model={"dimension": 4096})
    run = run_cli(job)
    status = run.report.get("status")
    record("job file", "--report of a run stopped by model.dimension",
           "status failed, error set", f"status {status}, error {run.report.get('error')!r}")
    assert run.exit_code == 2 and status == "failed" and run.report.get("error")


# ------------------------------------------------------------------------------ job files

YAML_CASES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "wrong type (token_budget: 'lots')": (
        {"batching": {"token_budget": "lots"}}, ["job.yaml: batching.token_budget: ", "'lots'"]),
    "wrong type in a union (source.path: 5)": (
        {"source": {"path": 5}}, ["job.yaml: source.path: expected str or list[str] (got 5)"]),
    "wrong type (metadata_fields: a string)": (
        {"source": {"metadata_fields": "title"}}, ["job.yaml: source.metadata_fields: "]),
    "unknown key": ({"chunking": {"max_tokenz": 5}},
                    ["job.yaml: chunking.max_tokenz: unknown key"]),
    "unknown source kind": ({"source": {"kind": "csv"}}, ["job.yaml: source.kind: ", "'csv'"]),
    "bad job name": ({"name": "bad name!"}, ["job.yaml: name: "]),
    "source glob matches nothing": ({"source": {"path": "nope/*.jsonl"}},
                                    ["error: nope/*.jsonl: no such file"]),
    "source file missing": ({"source": {"path": "missing.jsonl"}},
                            ["error: missing.jsonl: no such file"]),
    "source of an unknown file type": ({"source": {"path": "job.yaml"}},
                                       ["error: job.yaml: unknown file type"]),
    "model path missing": ({"model": {"path": "/nonexistent/model"}},
                           ["model.path: /nonexistent/model: no such model directory"]),
    "model directory without config.json": ({"model": {"path": "."}},
                                            ["model.path: ", "has no config.json"]),
    "model package not installed": ({"model": {"path": "package:no_such_pkg/model"}},
                                    ["model.path: package 'no_such_pkg' is not installed"]),
    "dimension larger than the model": ({"model": {"dimension": 4096}},
                                        ["model.dimension: 4096 > model hidden size 384"]),
    "dimension 0": ({"model": {"dimension": 0}}, ["job.yaml: model.dimension: "]),
    "overlap >= max_tokens/2": ({"chunking": {"max_tokens": 128, "overlap_tokens": 64}},
                                ["job.yaml: chunking.overlap_tokens: 64 must be < max_tokens/2"]),
    "parquet sink without path": ({"sink": {"kind": "parquet"}},
                                  ["job.yaml: sink.path is required for a parquet sink"]),
    "milvus sink without uri": ({"sink": {"uri": None}}, ["job.yaml: sink.uri is required"]),
}


@pytest.mark.parametrize("case", YAML_CASES)
def test_bad_job_file(tmp_path: Path, case: str) -> None:
    """A job file problem is one line naming the job file (or the setting) and the field."""
    overrides, needles = YAML_CASES[case]
    job = make_job(tmp_path, short_docs(1), **overrides)
    expect_error(run_cli(job), "job file", case, *needles)


RAW_YAML: dict[str, tuple[bytes, str]] = {
    "invalid YAML syntax": (b"name: x\nsource: [unclosed\n", "job.yaml:3: invalid YAML"),
    "tab indentation": (b"name: x\n\tsource: y\n", "job.yaml:2: invalid YAML"),
    "not a mapping (a list)": (b"- name\n- source\n", "job.yaml: a job file must be a mapping"),
    "empty job file": (b"", "job.yaml: a job file must be a mapping"),
    "not UTF-8 (Latin-1 bytes)": (b"name: t\ntitle: caf\xe9\n", "job.yaml:2: not UTF-8 text"),
}


@pytest.mark.parametrize("case", RAW_YAML)
def test_unparseable_job_file(tmp_path: Path, case: str) -> None:
    content, needle = RAW_YAML[case]
    job = tmp_path / "job.yaml"
    job.write_bytes(content)
    expect_error(run_cli(job), "job file", case, f"error: {needle}")


def test_unknown_device(tmp_path: Path) -> None:
    job = make_job(tmp_path, short_docs(1), sink=PARQUET_SINK, model={"device": "tpu"})
    expect_error(run_cli(job), "job file", "model.device: 'tpu'", "model.device: 'tpu'")


def test_cuda_device_without_cuda(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    job = make_job(tmp_path, short_docs(1), sink=PARQUET_SINK, model={"device": "cuda"})
    expect_error(run_cli(job), "job file", "model.device: cuda without a GPU", "model.device")


# --------------------------------------------------------------------------------- Milvus


EXIT_UNAVAILABLE = 6  # pipeline/cli.py: the destination stayed unavailable through every retry


def test_unreachable_milvus_server(tmp_path: Path) -> None:
    """A server URI nobody listens on: one line naming the URI, exit 6 (try again later),
    well within 30 s."""
    job = make_job(tmp_path, short_docs(1), sink={"uri": "http://127.0.0.1:1",
                                                  "retry_base_delay_s": 0.05})
    t0 = time.monotonic()
    run = run_cli(job)
    elapsed = time.monotonic() - t0
    needle = "error: milvus http://127.0.0.1:1 collection "
    record("Milvus", "server URI unreachable (http://127.0.0.1:1)",
           f"exit {EXIT_UNAVAILABLE}, one line: {needle}… connect", run.observed())
    assert run.exception is None, f"crashed: {run.exception!r}"
    assert run.exit_code == EXIT_UNAVAILABLE, run.output
    assert len(run.lines) == 1 and run.lines[0].startswith(needle), run.output
    assert "Traceback" not in run.output and elapsed < 30


def test_unreachable_milvus_server_is_retried(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection at the start of a run gets sink.retries attempts, as the message says."""
    import pipeline.sinks.milvus.client as milvus_client

    attempts: list[str] = []
    real_client = milvus_client.MilvusClient

    def counting_client(*args: Any, **kwargs: Any) -> Any:
        attempts.append(str(args[0]) if args else "")
        return real_client(*args, **kwargs)

    monkeypatch.setattr(milvus_client, "MilvusClient", counting_client)
    job = make_job(tmp_path, short_docs(1), sink={"uri": "http://127.0.0.1:1", "retries": 3,
                                                  "retry_base_delay_s": 0.05})
    run = run_cli(job)
    record("Milvus", "server URI unreachable: connection attempts",
           "3 attempts (sink.retries: 3), then exit 6",
           f"{len(attempts)} attempt(s), exit {run.exit_code}")
    assert run.exit_code == EXIT_UNAVAILABLE and len(attempts) == 3, (attempts, run.output)


MILVUS_CASES: dict[str, tuple[str, str | None, str]] = {
    # case: (sink.uri, a regular file to create first, expected message part)
    "Lite db path whose parent is a file": (
        "afile/out.db", "afile", "cannot create the Lite db's directory afile: afile is a file"),
    "Lite db path that is a regular file": (
        "out.db", "out.db", "exists and is not a Milvus Lite db"),
    "Lite db path without .db": ("out.sqlite", None, "a Milvus Lite path must end in .db"),
}


@pytest.mark.parametrize("case", MILVUS_CASES)
def test_bad_milvus_lite_path(tmp_path: Path, case: str) -> None:
    uri, blocker, needle = MILVUS_CASES[case]
    if blocker:
        (tmp_path / blocker).write_text("not a directory")
    job = make_job(tmp_path, short_docs(1), sink={"uri": uri})
    expect_error(run_cli(job), "Milvus", case, f"error: milvus {uri}: {needle}")


def test_reliability_table_is_escaped_and_sorted() -> None:
    """The table is sorted and escaped, so the same rows always give the same file."""
    from reliability import Row, render, rows

    table = render([Row("a", "z", "e|1", "o\nx")])
    assert "`EMBED_JOB_WRITE_RELIABILITY=1 python -m pytest -n 0 tests/test_bad_input.py " \
           "tests/test_faults.py tests/test_data_safety.py tests/test_first_contact.py`" in table
    assert table.splitlines()[-1] == "| a | z | e\\|1 | o x |"
    keys = [(r.category, r.case) for r in rows()]
    assert keys == sorted(keys)


# ------------------------------------------- source paths, repeated job-file keys, the hub


def test_directory_as_source_path(tmp_path: Path) -> None:
    """A directory is not a file: say so, and suggest the glob that reads its files."""
    write_parquet(tmp_path / "data" / "a.parquet", {"id": ["x"], "text": ["fine"]})
    job = make_job(tmp_path, [], sink=PARQUET_SINK, source={"path": "data"})
    expect_error(run_cli(job), "source paths", "a directory as source.path",
                 "data/ is a directory; use a glob such as data/*.parquet")


def test_fifo_as_source_path(tmp_path: Path) -> None:
    """A FIFO (or device) named as the source is refused in one line, never opened."""
    import os

    job = make_job(tmp_path, [], sink=PARQUET_SINK, source={"path": "pipe.jsonl"})
    os.mkfifo(tmp_path / "pipe.jsonl")
    expect_error(run_cli(job), "source paths", "a FIFO as source.path",
                 "pipe.jsonl: not a regular file but a FIFO (named pipe)")


def test_glob_skips_a_fifo_and_a_directory(tmp_path: Path) -> None:
    """What a glob matches that is not a regular file is skipped: the files are read."""
    import os

    job = make_job(tmp_path, short_docs(2), sink=PARQUET_SINK, source={"path": "*.jsonl"})
    os.mkfifo(tmp_path / "pipe.jsonl")
    (tmp_path / "dir.jsonl").mkdir()
    run = run_cli(job)
    record("source paths", "glob matching a FIFO and a directory besides a file",
           "exit 0, the file's 2 docs stored, the others skipped", run.observed())
    assert run.exception is None and run.exit_code == 0, run.output
    assert set(stored_chunks(run)) == {d["id"] for d in short_docs(2)}


def test_symlink_loop_under_double_star_glob(tmp_path: Path) -> None:
    """data/sub/up -> .. makes glob name every file once per lap: each is read once, not
    dead-lettered ~40 times as a duplicate id."""
    import os

    docs = short_docs(3)
    (tmp_path / "data" / "sub").mkdir(parents=True)
    job = make_job(tmp_path, docs[:2], sink=PARQUET_SINK, source={"path": "data/**/*.jsonl"})
    (tmp_path / "corpus.jsonl").rename(tmp_path / "data" / "corpus.jsonl")
    (tmp_path / "data" / "sub" / "more.jsonl").write_text(json.dumps(docs[2]) + "\n")
    os.symlink("..", tmp_path / "data" / "sub" / "up")
    run = run_cli(job)
    record("source paths", "'**' glob through a symlink loop (data/sub/up -> ..)",
           "exit 0, 3 docs stored, 0 dead letters",
           f"{run.observed()}, {len(run.dead_letters)} dead letters")
    assert run.exception is None and run.exit_code == 0, run.output
    assert run.dead_letters == [] and run.report["docs"] == 3
    assert set(stored_chunks(run)) == {d["id"] for d in docs}


def test_nan_metadata_from_pandas_is_stored_as_null(tmp_path: Path) -> None:
    """A pandas float column with missing values (NaN) and ±inf: the job completes and the
    stored metadata is JSON with null (it used to stop at the sink: NaN is not JSON)."""
    import numpy as np
    import pandas as pd

    docs = short_docs(3)
    (tmp_path / "data").mkdir()
    pd.DataFrame({"id": [d["id"] for d in docs], "text": [d["text"] for d in docs],
                  "score": [np.nan, np.inf, 0.5]}).to_parquet(tmp_path / "data" / "a.parquet")
    pq.write_table(pa.table({"id": ["nan-b"], "text": [docs[0]["text"] + " (b)"],
                             "score": pa.array([float("-inf")])}), tmp_path / "data" / "b.parquet")
    job = make_job(tmp_path, [], sink=PARQUET_SINK,
                   source={"path": "data/*.parquet", "metadata_fields": ["score"]})
    run = run_cli(job)
    stored: dict[str, Any] = {}
    if run.published:
        for f in sorted(published_version(run.dir / PARQUET_SINK["path"]).glob("*.parquet")):
            t = pq.read_table(f, columns=["doc_id", "metadata"])
            stored.update(zip(t["doc_id"].to_pylist(), t["metadata"].to_pylist()))
    record("Parquet rows", "NaN / ±Infinity metadata (pandas float column)",
           'exit 0, stored metadata {"score": null}', f"{run.observed()}, {sorted(stored.values())}")
    assert run.exception is None and run.exit_code == 0, run.output
    assert {k: json.loads(v) for k, v in stored.items()} == {
        docs[0]["id"]: {"score": None}, docs[1]["id"]: {"score": None},
        docs[2]["id"]: {"score": 0.5}, "nan-b": {"score": None}}


def _duplicated_sink(tmp_path: Path) -> tuple[Path, int, int]:
    """A job file with a second ``sink:`` mapping at the end: (path, its line, the first's)."""
    job = make_job(tmp_path, short_docs(1), sink=PARQUET_SINK)
    lines = job.read_text(encoding="utf-8").splitlines()
    first = next(n for n, line in enumerate(lines, 1) if line == "sink:")
    job.write_text("\n".join([*lines, "sink:", "  kind: milvus", "  uri: other.db"]) + "\n",
                   encoding="utf-8")
    return job, len(lines) + 1, first


def test_duplicate_key_in_job_file(tmp_path: Path) -> None:
    """PyYAML keeps the last of two equal keys silently: a second sink: replaced the first."""
    job, line, first = _duplicated_sink(tmp_path)
    expect_error(run_cli(job), "job file", "duplicate key (a second sink: mapping)",
                 f"error: job.yaml:{line}: duplicate key 'sink' (first at line {first})")


def test_duplicate_keys_at_every_level_one_line_each(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("name: t\n"
                   "source:\n"
                   "  path: corpus.jsonl\n"
                   "  text_field: text\n"
                   "  path: other.jsonl\n"
                   "model: {path: m, device: cpu, device: cuda}\n"
                   "sink: {kind: parquet, path: v}\n"
                   "base: &b {a: 1}\n"  # refused too (unknown key), but after the duplicates
                   "name: t2\n", encoding="utf-8")
    run = run_cli(job)
    record("job file", "duplicate keys at three levels (3 lines)",
           "exit 2, one line per duplicate: job.yaml:LINE: duplicate key 'KEY'", run.observed())
    assert run.exception is None and "Traceback" not in run.output, run.output
    assert run.exit_code == 2
    assert [run.short(line) for line in run.lines] == [
        "error: job.yaml:5: duplicate key 'path' (first at line 3)",
        "error: job.yaml:6: duplicate key 'device' (first at line 6)",
        "error: job.yaml:9: duplicate key 'name' (first at line 1)"]


def test_yaml_merge_key_override_is_not_a_duplicate(tmp_path: Path) -> None:
    """``<<: *anchor`` then one of the anchor's keys is YAML's merge rule, not a repeated key."""
    from pipeline.job.load import load_job

    job = make_job(tmp_path, short_docs(1), model={"sglang": {"extra": {"a": 1, "b": 2}}})
    text = job.read_text(encoding="utf-8")
    text = text.replace("    extra:\n", "    extra: &x\n", 1).replace(
        "sink:\n", "sink:\n  index:\n    params: {<<: *x, a: 5}\n", 1)
    job.write_text(text, encoding="utf-8")
    params = load_job(job).sink.index.params
    record("job file", "merge key (<<: *anchor) overriding a key of the anchor",
           "accepted: the override wins, no duplicate key", f"index.params = {params}")
    assert params == {"a": 5, "b": 2}


HUB_NAME = "nonexistent-org/nonexistent-dataset"


def _hub_job(tmp_path: Path) -> Path:
    return make_job(tmp_path, [], sink=PARQUET_SINK,
                    source={"kind": "hf", "dataset": HUB_NAME, "path": None,
                            "metadata_fields": []})


def _hub_env(tmp_path: Path, **env: str) -> dict[str, str | None]:
    """Datasets' caches in ``tmp_path``, and no offline setting but ``env``'s."""
    unset = dict.fromkeys(("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return {**unset, "HF_HOME": str(tmp_path / "hf"),
            "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"), **env}


HUB_CASES = {
    "HF_HUB_OFFLINE=1": ({"HF_HUB_OFFLINE": "1"},
                         "the Hugging Face Hub is not tried (HF_HUB_OFFLINE is set)"),
    "no network (hub endpoint refuses connections)": (
        {"HF_ENDPOINT": "http://127.0.0.1:1"}, "the Hugging Face Hub cannot be reached ("),
}


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case", HUB_CASES)
def test_hub_dataset_out_of_reach(tmp_path: Path, case: str, command: str) -> None:
    """``kind: hf`` with a hub id on a machine without the hub: one line in seconds (it was
    ~30 s of retries, then a traceback), exit 2, in a real process."""
    env, needle = HUB_CASES[case]
    job = _hub_job(tmp_path)
    started = time.monotonic()
    proc = invoke(command, str(job), *(["--quiet"] if command == "run" else []),
                  process=True, cwd=tmp_path, env=_hub_env(tmp_path, **env))
    elapsed = time.monotonic() - started
    run = Run(job, proc.exit_code, proc.stderr)
    errors = [line for line in run.lines if line.startswith("error: ")]
    record("datasets source", f"hub dataset out of reach, {case} ({command})",
           f"exit 2 in < 10 s, one line: not a local dataset … {needle}",
           f"{run.observed()} ({elapsed:.0f} s)")
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.exit_code == 2, proc.stderr
    assert len(errors) == 1, proc.stderr
    assert f"hf:{HUB_NAME}: not a local dataset ({HUB_NAME} does not exist)" in run.short(errors[0])
    assert needle in errors[0] and "save_to_disk" in errors[0]
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert not run.published
