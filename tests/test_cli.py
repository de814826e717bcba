"""The command line through Click's runner: messages, exit codes, status, reports."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers.cli import invoke, run
from helpers.jobs import REPO, demo_docs, make_job, state_dir, write_jsonl

from pipeline.job.load import load_job


def test_validate_prints_the_resolved_job(tmp_path: Path) -> None:
    job = make_job(tmp_path, demo_docs(2))
    result = invoke("validate", str(job))
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout)
    assert resolved["batching"]["sort_window"] == 50_000  # defaults filled in
    assert resolved["chunking"]["over_length"] == "split"


def test_validate_shipped_demo_job() -> None:
    result = invoke("validate", str(REPO / "jobs" / "demo.yaml"))
    assert result.exit_code == 0, result.output


def test_unknown_key_and_bad_type_are_one_line_each(tmp_path: Path) -> None:
    job = make_job(tmp_path, demo_docs(1), chunking={"max_tokenz": 5}, batching={"token_budget": "lots"})
    result = invoke("validate", str(job))
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert f"error: {job}: chunking.max_tokenz: unknown key" in errors
    assert any(e.startswith(f"error: {job}: batching.token_budget:") for e in errors)
    assert "Traceback" not in result.output


def test_dimension_larger_than_the_model_is_named(tmp_path: Path) -> None:
    job = make_job(tmp_path, demo_docs(1), model={"dimension": 3000})
    result = invoke("validate", str(job))
    assert result.exit_code == 2
    assert f"{job}: model.dimension: 3000 > model hidden size 384" in result.output


def test_missing_source_and_model_are_named(tmp_path: Path) -> None:
    job = make_job(tmp_path, demo_docs(1), source={"path": "nope/*.jsonl"},
                   model={"path": str(tmp_path / "no-model")})
    result = invoke("validate", str(job))
    assert result.exit_code == 2
    assert "nope/*.jsonl" in result.output and "no-model" in result.output
    assert "Traceback" not in result.output
    ran = run(job, report=False)
    assert ran.exit_code == 2 and "Traceback" not in ran.output


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    job = tmp_path / "bad.yaml"
    job.write_text("name: x\nsource: [unclosed\n")
    result = invoke("validate", str(job))
    assert result.exit_code == 2
    assert f"error: {job}:" in result.output and "invalid YAML" in result.output


def test_status_before_and_after_a_run(tmp_path: Path) -> None:
    job = make_job(tmp_path, demo_docs(3), sink={"kind": "parquet", "path": "v"})
    before = json.loads(invoke("status", str(job), "--json").output)
    assert before["state"] == "not started" and "published_target" not in before
    ran = run(job, quiet=False)
    assert ran.exit_code == 0, ran.output
    assert "documents     3" in ran.output  # the one-screen summary
    after = json.loads(invoke("status", str(job), "--json").output)
    report = ran.report
    assert after["state"] == "published"
    assert after["published_documents"] == report["docs"] == 3
    assert after["published_target"] == report["target"]
    assert report["vectors_written"] == report["chunks"] == report["vectors_in_target"] > 0
    text = invoke("status", str(job))
    assert "published" in text.output and "published_target" in text.output
    # validate reads the destination as run will: this job's own Parquet directory passes,
    # another job's CURRENT there is refused
    checked = invoke("validate", str(job))
    assert checked.exit_code == 0, checked.output
    assert f"# destination: checked {tmp_path / 'v'} (local)" in checked.stderr
    other = yaml.safe_load(job.read_text())
    other["name"] = "u"  # another job, in its own (default) checkpoint_dir
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    refused = invoke("validate", str(tmp_path / "other.yaml"))
    assert refused.exit_code == 2
    assert error_lines(refused) == [
        f"error: {tmp_path / 'other.yaml'}: sink.path: CURRENT points at "
        f"{report['target']!r}, which this job did not create (made by job 't'); use another "
        f"sink.path"]
    other["checkpoint_dir"] = str(state_dir(job).root)  # t's state: refused before the destination
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    [line] = error_lines(invoke("validate", str(tmp_path / "other.yaml")))
    assert line.startswith(f"error: {tmp_path / 'other.yaml'}: checkpoint_dir: "
                           f"{state_dir(job).root} holds the state of job 't' "), line


def test_status_of_an_unfinished_run(tmp_path: Path) -> None:
    job = make_job(tmp_path, demo_docs(4), sink={"kind": "parquet", "path": "v"})
    trial = run(job, "--limit", "2", report=False)
    assert trial.exit_code == 0, trial.output
    state = json.loads(invoke("status", str(job), "--json").output)
    assert state["state"] == "in progress (plan incomplete)" and not state["plan_complete"]
    assert state["documents"] == 2 and state["batches_done"] == state["batches"] > 0
    assert state["percent_done"] is None  # every planned batch is done, but not the run
    shown = [line.split() for line in invoke("status", str(job)).output.splitlines()]
    assert ["percent_done", "-"] in shown
    assert ["state", "in", "progress", "(plan", "incomplete)"] in shown


def test_status_shows_where_the_dead_letters_are_and_why(tmp_path: Path) -> None:
    docs = demo_docs(3) + [{"id": f"empty-{i}", "text": ""} for i in range(3)]
    job = make_job(tmp_path, docs, sink={"kind": "parquet", "path": "v"},
                   max_dead_letter_ratio=1.0)
    with (tmp_path / "corpus.jsonl").open("a") as f:
        f.write("{not json\n")
    assert run(job, report=False).exit_code == 0
    state = json.loads(invoke("status", str(job), "--json").output)
    assert state["dead_letters"] == 4
    assert state["dead_letter_file"] == str(state_dir(job).dead_letters)
    reasons = state["dead_letter_reasons"]
    assert len(reasons) == 2 and sorted(reasons.values()) == [1, 3], reasons
    text = invoke("status", str(job)).output
    lines = {line.split()[0]: line.split(None, 1)[1] for line in text.splitlines()}
    assert lines["dead_letter_file"] == state["dead_letter_file"]
    assert lines["dead_letter_reasons"].startswith("3 x field 'text': empty; 1 x "), text


def test_quiet_prints_nothing_on_success(tmp_path: Path) -> None:
    job = make_job(tmp_path, demo_docs(2), sink={"kind": "parquet", "path": "v"})
    result = run(job, report=False)
    assert result.exit_code == 0 and result.output == ""


# ------------------------------------------------------------------ help and init


EXIT_CODES = ("0", "1", "2", "3", "4", "5", "6", "7", "130", "143")


def test_help_is_self_contained() -> None:
    """A pip-installed user has no README: the help says what a job file is, how to start,
    and what every exit code means."""
    group = invoke("--help")
    assert group.exit_code == 0
    listed = {line.split()[0] for line in group.output.split("Exit codes:")[1].splitlines()
              if line.strip() and line.split()[0].isdigit()}
    assert listed == set(EXIT_CODES)
    for step in ("embed-job init > job.yaml", "embed-job validate job.yaml",
                 "embed-job run job.yaml"):
        assert step in group.output
    for command in ("", "init", "validate", "run", "status", "search", "audit"):
        text = invoke(*command.split(), "--help").output
        assert "README" not in text and "docs/" not in text, command


def test_init_prints_a_job_that_validates(tmp_path: Path) -> None:
    result = invoke("init")
    assert result.exit_code == 0 and result.stderr == ""
    (tmp_path / "job.yaml").write_text(result.stdout)
    write_jsonl(tmp_path / "data" / "corpus.jsonl", demo_docs(2))
    checked = invoke("validate", str(tmp_path / "job.yaml"))
    assert checked.exit_code == 0, checked.output
    assert "does not exist yet" in checked.stderr  # the Lite db: made by the first run


@pytest.mark.parametrize("sink, source", [("parquet", "parquet"), ("milvus", "hf"),
                                          ("parquet", "jsonl")])
def test_init_options_pick_the_sink_and_the_source(tmp_path: Path, sink: str,
                                                   source: str) -> None:
    result = invoke("init", "--sink", sink, "--source", source)
    assert result.exit_code == 0, result.output
    (tmp_path / "job.yaml").write_text(result.stdout)
    job = load_job(tmp_path / "job.yaml")
    assert (job.sink.kind, job.source.kind) == (sink, source)
    assert ("\n  rows_per_file: " in result.stdout) == (sink == "parquet")
    assert ("\n  dataset: " in result.stdout) == (source == "hf")


def test_offline_skips_a_hub_dataset(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text(invoke("init", "--source", "hf").stdout)
    result = invoke("validate", str(tmp_path / "job.yaml"), "--offline")
    assert result.exit_code == 0, result.output
    assert "# source: hub dataset 'org/name' not checked (--offline)" in result.stderr


def test_init_shows_every_setting_with_its_default() -> None:
    """The template cannot fall behind the job model: every key is written out (or, for a
    secret or certificate files, commented), with the model's default unless listed."""
    from pipeline.job.config import Job

    text = invoke("init").stdout
    printed = yaml.safe_load(text)
    commented = {"sink.token", "sink.token_env", "sink.tls"}
    other_sink = {"sink.path", "sink.rows_per_file"}  # parquet's, in `init --sink parquet`
    hf_only = {"source.dataset", "source.config", "source.split", "source.streaming",
               "source.data_files"}
    not_defaults = {"name", "source.kind", "source.path", "source.metadata_fields",
                    "model.path", "model.device", "sink.uri"}

    def walk(model: type, data: dict, prefix: str) -> None:
        for key, info in model.model_fields.items():
            dotted = prefix + key
            if dotted in commented | other_sink | hf_only:
                assert key not in data, dotted
                if dotted in commented:
                    assert f"# {key}: " in text, dotted
                continue
            assert key in data, f"{dotted} is missing from the template"
            sub = getattr(info.annotation, "model_fields", None)
            if sub is not None:
                walk(info.annotation, data[key], dotted + ".")
            elif dotted not in not_defaults and not info.is_required():
                default = info.get_default(call_default_factory=True)
                if hasattr(default, "model_dump"):
                    default = default.model_dump()
                assert data[key] == default, dotted

    walk(Job, printed, "")


# ------------------------------------------------------------------ validate: local checks


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_checkpoint_dir_that_cannot_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("not a directory")
    for where, expected in (("state", f"{tmp_path / 'state'} is a file, not a directory"),
                            ("state/t", f"{tmp_path / 'state'} is a file, so "
                                        f"{tmp_path / 'state' / 't'} cannot be created")):
        job = make_job(tmp_path, demo_docs(1), checkpoint_dir=where)
        result = invoke("validate", str(job))
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert error_lines(result) == [
            f"error: {job}: checkpoint_dir: {expected}; remove it or set checkpoint_dir"]


def test_checkpoint_dir_that_is_not_writable(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        locked = Path("/sys")  # root writes anywhere, but not into sysfs
    else:
        locked = tmp_path / "ro"
        locked.mkdir()
        locked.chmod(0o555)
    job = make_job(tmp_path, demo_docs(1), checkpoint_dir=str(locked / "t"))
    result = invoke("validate", str(job))
    assert result.exit_code == 2, result.output
    [line] = error_lines(result)
    assert line.startswith(f"error: {job}: checkpoint_dir: {locked} (where {locked / 't'} "
                           f"would be created) is not writable (")
    assert line.endswith("); fix its permissions or set checkpoint_dir")


def test_collection_names_a_server_refuses(tmp_path: Path) -> None:
    # a job name with '-' is the default collection name; a server refuses it
    job = make_job(tmp_path, demo_docs(1), name="wiki-zh",
                   sink={"uri": "http://127.0.0.1:1", "collection": None})
    result = invoke("validate", str(job), "--offline")
    assert result.exit_code == 2
    assert error_lines(result) == [
        f"error: {job}: sink.collection: the job name 'wiki-zh' (the default) is not a Milvus "
        f"collection name (letters, digits and _, not starting with a digit); set "
        f"sink.collection, e.g. 'wiki_zh'"]
    # Milvus Lite accepts it: a warning only
    job = make_job(tmp_path, demo_docs(1), name="wiki-zh", sink={"collection": None})
    result = invoke("validate", str(job))
    assert result.exit_code == 0, result.output
    assert "warning: " in result.stderr and "a server would not" in result.stderr
    # each generation is <collection>__<16 hex>: at most 255 bytes, on Lite too
    job = make_job(tmp_path, demo_docs(1), sink={"collection": "c" * 238})
    result = invoke("validate", str(job))
    assert result.exit_code == 2
    assert "is too long" in result.stderr and "use at most 237" in result.stderr


def test_sink_paths_blocked_by_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    cases = [
        ({"uri": "file"}, f"sink.uri: {tmp_path / 'file'} exists and is not a Milvus Lite db"),
        ({"uri": "vectors"}, f"sink.uri: milvus {tmp_path / 'vectors'}: a Milvus Lite path "
                             f"must end in .db"),
        ({"uri": "file/out.db"}, f"sink.uri: {tmp_path / 'file'} is a file, so "
                                 f"{tmp_path / 'file' / 'out.db'} cannot be created"),
        ({"kind": "parquet", "path": "file"},
         f"sink.path: {tmp_path / 'file'} is a file, not a directory; Parquet output needs a "
         f"directory"),
    ]
    for sink, expected in cases:
        job = make_job(tmp_path, demo_docs(1), sink=sink)
        result = invoke("validate", str(job))
        assert result.exit_code == 2, result.output
        [line] = error_lines(result)
        assert line.startswith(f"error: {job}: {expected}"), line


# ------------------------------------------------------------------ validate: destination


def test_lite_destination_names_taken_by_someone_else(tmp_path: Path) -> None:
    """An existing Lite db is opened: a real collection under the alias name, or an alias
    pointing at a collection this job did not make, is refused as `run` would."""
    from pymilvus import MilvusClient

    client = MilvusClient(str(tmp_path / "out.db"))
    client.create_collection("theirs", dimension=4)
    client.create_alias("theirs", "mine")
    client.close()
    job = make_job(tmp_path, demo_docs(1), sink={"collection": "theirs"})
    result = invoke("validate", str(job))
    assert result.exit_code == 2
    [line] = error_lines(result)
    assert line.startswith(f"error: {job}: sink.collection: milvus {tmp_path / 'out.db'}: a "
                           f"collection named 'theirs' exists"), line
    assert f"# destination: checked {tmp_path / 'out.db'} (local)" in result.stderr
    job = make_job(tmp_path, demo_docs(1), sink={"collection": "mine"})
    result = invoke("validate", str(job))
    assert result.exit_code == 2
    assert error_lines(result) == [
        f"error: {job}: sink.collection: the alias 'mine' points at 'theirs', which this job "
        f"did not create (not made by embed-job); use another sink.collection"]


def test_server_destination_offline_and_unreachable(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    job = make_job(tmp_path, demo_docs(1), sink={"uri": f"http://127.0.0.1:{port}"})
    offline = invoke("validate", str(job), "--offline")
    assert offline.exit_code == 0, offline.output
    assert "# destination: not checked (--offline)" in offline.stderr
    online = invoke("validate", str(job))
    assert online.exit_code == 6, online.output  # nothing else wrong: try again later
    [line] = error_lines(online)
    assert line.startswith(f"error: {job}: sink.uri: cannot reach the server: milvus "
                           f"http://127.0.0.1:{port} collection 't': connect: "), line
    assert f"# destination: not checked (http://127.0.0.1:{port} unreachable)" in online.stderr
    assert "Traceback" not in online.output
    # with another problem too, the job file is what needs fixing: exit 2
    broken = make_job(tmp_path, demo_docs(1), sink={"uri": f"http://127.0.0.1:{port}"},
                      model={"dimension": 3000})
    assert invoke("validate", str(broken)).exit_code == 2


@pytest.fixture
def lite_server(tmp_path: Path) -> Iterator[str]:
    """``milvus-lite server`` on localhost: a server URI without a server install."""
    from milvus_server import lite_server as serve

    with serve(tmp_path / "served.db") as uri:
        yield uri


def test_server_destination_is_checked_over_the_network(tmp_path: Path, lite_server: str) -> None:
    from pymilvus import MilvusClient

    client = MilvusClient(lite_server)
    client.create_collection("taken", dimension=4)
    client.close()
    job = make_job(tmp_path, demo_docs(1), sink={"uri": lite_server, "collection": "fresh"})
    result = invoke("validate", str(job))
    assert result.exit_code == 0, result.output
    assert f"# destination: checked {lite_server} (network)" in result.stderr
    job = make_job(tmp_path, demo_docs(1), sink={"uri": lite_server, "collection": "taken"})
    result = invoke("validate", str(job))
    assert result.exit_code == 2 and "a collection named 'taken' exists" in result.stderr
