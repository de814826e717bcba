"""README's Python snippets run as written, against a freshly built demo.

The demo job runs from a temporary copy of ``jobs/`` (the tree is never touched), and the
snippets run from the copy's parent, so their ``jobs/out/demo.db`` is the copy's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.cli import run
from helpers.jobs import REPO

from pipeline.job.load import load_job

SNIPPET = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory whose ``jobs/`` is a copy of the repo's, with the demo job run in it."""
    root = tmp_path_factory.mktemp("readme")
    demo = load_job(REPO / "jobs" / "demo.yaml")
    made_by_runs = {demo.state.root.parent, demo.resolve(demo.sink.uri).parent}
    shutil.copytree(REPO / "jobs", root / "jobs",
                    ignore=lambda d, names: [n for n in names if Path(d, n) in made_by_runs])
    done = run(root / "jobs" / "demo.yaml", report=False, process=True,
               env={"PYTHONPATH": str(REPO)})
    assert done.exit_code == 0, done.stderr
    return root


def snippets() -> list[str]:
    return SNIPPET.findall((REPO / "README.md").read_text(encoding="utf-8"))


def test_readme_has_python_snippets() -> None:
    assert snippets(), "README.md has no ```python block"


@pytest.mark.parametrize("index", range(len(snippets())))
def test_readme_snippet_runs(demo_root: Path, index: int) -> None:
    result = python(demo_root, "-c", snippets()[index])
    assert result.returncode == 0, f"README snippet {index + 1} failed:\n{result.stderr[-2000:]}"
