"""The command line through Click's runner: messages, exit codes, status, reports."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from click.testing import CliRunner

from conftest import REPO, demo_docs, make_job
from pipeline.cli import main


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


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
    run = invoke("run", str(job), "--quiet")
    assert run.exit_code == 2 and "Traceback" not in run.output


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    job = tmp_path / "bad.yaml"
    job.write_text("name: x\nsource: [unclosed\n")
    result = invoke("validate", str(job))
    assert result.exit_code == 2
    assert f"error: {job}:" in result.output and "invalid YAML" in result.output


def test_status_before_and_after_a_run(tmp_path: Path) -> None:
    job = make_job(tmp_path, demo_docs(3), sink={"kind": "parquet", "path": "v", "uri": None})
    before = json.loads(invoke("status", str(job), "--json").output)
    assert before["state"] == "not started" and "published_target" not in before
    run = invoke("run", str(job), "--report", str(tmp_path / "report.json"))
    assert run.exit_code == 0, run.output
    assert "documents     3" in run.output  # the one-screen summary
    after = json.loads(invoke("status", str(job), "--json").output)
    report = json.loads((tmp_path / "report.json").read_text())
    assert after["state"] == "published"
    assert after["published_documents"] == report["docs"] == 3
    assert after["published_target"] == report["target"]
    assert report["vectors_written"] == report["chunks"] == report["vectors_in_target"] > 0
    text = invoke("status", str(job))
    assert "published" in text.output and "published_target" in text.output


def test_status_of_an_unfinished_run(tmp_path: Path) -> None:
    job = make_job(tmp_path, demo_docs(4), sink={"kind": "parquet", "path": "v", "uri": None})
    trial = invoke("run", str(job), "--quiet", "--limit", "2")
    assert trial.exit_code == 0, trial.output
    state = json.loads(invoke("status", str(job), "--json").output)
    assert state["state"] == "in progress" and not state["plan_complete"]
    assert state["documents"] == 2 and state["batches_done"] == state["batches"] > 0


def test_quiet_prints_nothing_on_success(tmp_path: Path) -> None:
    job = make_job(tmp_path, demo_docs(2), sink={"kind": "parquet", "path": "v", "uri": None})
    result = invoke("run", str(job), "--quiet")
    assert result.exit_code == 0 and result.output == ""
