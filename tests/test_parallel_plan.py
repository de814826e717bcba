"""Planning with worker processes writes the very plan that one process writes: the same files
byte for byte, the same dead letters in the same order, whatever it meets on the way
(duplicates, bad rows, unembeddable and unchanged documents, a limit, a resume, a stop, an
error in a worker or in the reader)."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.jobs import demo_docs

from pipeline.chunking import Chunker, ModelTokenizer
from pipeline.errors import ConfigError, InputError
from pipeline.job.sections import BatchingConfig, ChunkingConfig
from pipeline.plan import parallel
from pipeline.plan.batching import WindowStats
from pipeline.plan.build import RejectedRows, build_plan
from pipeline.plan.store import PlanStore
from pipeline.records import DeadLetter, Document

ZH = ["向量数据库用于存储和检索高维向量。嵌入模型把文本映射为向量，语义相近的文本在向量空间中也彼此接近。",
      "长江是中国最长的河流，全长六千三百多公里，流经青海、西藏、四川、云南、重庆、湖北、湖南、江西、安徽、江苏和上海。",
      "春天来了，公园里的桃花和樱花都开了。周末的早上，很多家庭带着孩子去草地上放风筝、野餐，老人们在树荫下打太极拳。",
      "分块时，每个块的词元必须与模型实际看到的词元完全一致，否则批处理时统计的词元数就不是实际嵌入的词元数。",
      "这家小店的牛肉面已经开了三十年。汤是用牛骨熬了一整夜的，面是老板每天早上亲手拉的；你去过吗？",
      "我们使用 Milvus 2.4 存储 embedding 向量，并用 Parquet 文件做离线备份。Qwen3-Embedding 模型采用 "
      "last-token pooling，所以每个序列末尾都要加上 <|endoftext|>。"]
BATCHING = BatchingConfig(token_budget=1024, max_batch_size=16, sort_window=40,
                          window_tokens=3000, first_window=8)
LONG_ID = "x" * 60


def corpus() -> list[Document]:
    """English (the demo corpus), Chinese and mixed documents of one to many chunks, with
    duplicate ids, an id too long for the destination, metadata, and texts that chunk to
    nothing."""
    rng = random.Random(7)
    english = [d["text"] for d in demo_docs(94)]
    docs = []
    for i in range(150):
        kind = i % 3
        if kind == 0:
            text = english[i % len(english)]
        elif kind == 1:
            text = "".join(rng.choice(ZH) for _ in range(rng.randint(1, 12)))
        else:
            text = "\n\n".join(rng.choice(english) if rng.random() < 0.5 else rng.choice(ZH)
                               for _ in range(rng.randint(2, 8)))
        docs.append(Document(f"d{i}", text, f"corpus:{i}", {"n": i, "lang": "zh" if kind else "en"}))
    docs[20] = Document("d5", docs[20].text, "corpus:20")  # duplicates: in the same window,
    docs[120] = Document("d7", "not the first d7", "corpus:120")  # and windows later
    docs[33] = Document("d33", "", "corpus:33")  # nothing to embed
    docs[34] = Document("d34", " \n\t ", "corpus:34")
    docs[60] = Document(LONG_ID, docs[60].text, "corpus:60")
    return docs


def read(docs: list[Document], rejected: RejectedRows, fail_at: int | None = None,
         start: int = 0) -> Iterator[Document]:
    """A reader that rejects rows between documents, as a real one reports its bad rows:
    named and unnamed ones, and some after the last document."""
    for i, doc in enumerate(docs[start:], start):
        if i % 17 == 3:
            rejected(DeadLetter(f"bad{i}", f"corpus:{i}.5", "field text: not a string"))
        if i % 29 == 5:
            rejected(DeadLetter(None, f"corpus:{i}.7", "not JSON"))
        if i == fail_at:
            raise InputError(f"corpus:{i}: the reader stops here")
        yield doc
    rejected(DeadLetter("trailing", "corpus:end", "field id: missing"))


def skip_some(doc_id: str, _doc_hash: str) -> bool:
    return doc_id.endswith("4")


@pytest.fixture(scope="module", params=["qwen3", "minilm"])
def chunker(request: pytest.FixtureRequest) -> Chunker:
    if request.param == "qwen3":
        tok = ModelTokenizer.from_model_dir(request.getfixturevalue("qwen_tokenizer_dir"), "last")
    else:
        tok = ModelTokenizer.from_model_dir(request.getfixturevalue("minilm_dir"), "mean")
    return Chunker(tok, ChunkingConfig(max_tokens=96, overlap_tokens=8), 512)


@pytest.fixture(autouse=True)
def small_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many small groups, so that the bound on groups in flight is reached."""
    monkeypatch.setattr(parallel, "FIRST_GROUP_CHARS", 500)
    monkeypatch.setattr(parallel, "GROUP_CHARS", 4000)


def plan(directory: Path, chunker: Chunker, processes: int, fail_at: int | None = None,
         start: int = 0,
         on_window: Callable[[WindowStats], None] | None = None, **kwargs: Any
         ) -> tuple[dict[str, bytes], list[DeadLetter], list[WindowStats], BaseException | None]:
    """Plan into ``directory`` (resuming what it holds): its files, the dead letters in the
    order written, the windows reported, and the error that ended planning, if any."""
    letters: list[DeadLetter] = []
    windows: list[WindowStats] = []
    rejected = RejectedRows(letters.append)
    store = PlanStore(directory)
    error = None

    def window_done(stats: WindowStats) -> None:
        windows.append(stats)
        if on_window is not None:
            on_window(stats)
    try:
        build_plan(read(corpus(), rejected, fail_at, start), chunker, store, BATCHING, "fp", True,
                   letters.append, window_done, rejected=rejected, processes=processes, **kwargs)
    except Exception as e:
        error = e
    assert not multiprocessing.active_children(), "the workers outlived build_plan"
    files = {p.name: p.read_bytes() for p in sorted(directory.iterdir())} if directory.exists() else {}
    return files, letters, windows, error


def test_the_plan_is_the_same_bytes(tmp_path: Path, chunker: Chunker) -> None:
    kwargs = dict(unchanged=skip_some, max_id_bytes=40)
    one = plan(tmp_path / "one", chunker, 1, **kwargs)
    three = plan(tmp_path / "three", chunker, 3, **kwargs)
    files, letters, windows, error = one
    assert error is None and len(windows) > 5 and PlanStore(tmp_path / "one").complete
    reasons = " ".join(d.reason for d in letters)
    assert "duplicate id" in reasons and "empty text" in reasons and "60 bytes" in reasons
    assert three == one


def test_a_limit_then_a_resume(tmp_path: Path, chunker: Chunker) -> None:
    for processes in (1, 3):
        first = plan(tmp_path / f"p{processes}", chunker, processes, limit=71)
        store = PlanStore(tmp_path / f"p{processes}")
        assert not store.complete and store.all_stats()[-1].doc_end == 71
        again = plan(tmp_path / f"p{processes}", chunker, processes, start=71)
        assert PlanStore(tmp_path / f"p{processes}").complete
        if processes == 1:
            serial = (first, again)
    assert (first, again) == serial


@pytest.mark.parametrize("at", [2, -1], ids=["midway", "before_it_starts"])
def test_a_stop_ends_planning_at_the_same_document(tmp_path: Path, chunker: Chunker,
                                                   at: int) -> None:
    """Stopped after a window, planning reads one document more and ends there; stopped
    before it starts, it reads one document and plans nothing (the plan is not complete)."""
    results = []
    for processes in (1, 3):
        stop = threading.Event()
        if at < 0:
            stop.set()
        results.append(plan(tmp_path / f"p{processes}", chunker, processes, stop=stop,
                            on_window=lambda s: stop.set() if s.window == at else None))
        assert not PlanStore(tmp_path / f"p{processes}").complete
    assert len(results[0][2]) == at + 1
    assert results[1] == results[0]


class Slow(Chunker):
    """A worker busy for a minute on one document."""

    def chunk(self, doc: Document) -> Any:
        if doc.doc_id == "d40":
            time.sleep(60)
        return super().chunk(doc)


def test_a_stop_does_not_wait_for_a_busy_worker(tmp_path: Path, minilm_dir: Path) -> None:
    slow = Slow(ModelTokenizer.from_model_dir(minilm_dir, "mean"), ChunkingConfig(), 512)
    stop = threading.Event()
    threading.Timer(3.0, stop.set).start()
    t = time.monotonic()
    _, _, windows, error = plan(tmp_path / "plan", slow, 3, stop=stop)
    assert error is None and time.monotonic() - t < 20
    assert all(w.doc_end <= 40 for w in windows) and not PlanStore(tmp_path / "plan").complete


class Failing(Chunker):
    """Raises for one document, as a tokenizer failing in a worker would."""

    def chunk(self, doc: Document) -> Any:
        if doc.doc_id == "d90":
            raise ConfigError("model.path: the tokenizer failed on d90")
        return super().chunk(doc)


@pytest.mark.parametrize("where", ["worker", "reader", "lookup", "bad_row"])
def test_an_error_surfaces_where_one_process_meets_it(tmp_path: Path, chunker: Chunker,
                                                     where: str) -> None:
    def lookup(doc_id: str, doc_hash: str) -> bool:
        if doc_id == "d80":
            raise OSError("sync state: disk I/O error")
        return False

    if where == "worker":
        chunker = Failing(chunker.tokenizer, ChunkingConfig(max_tokens=96, overlap_tokens=8), 512)
    kwargs: dict[str, Any] = {"reader": dict(fail_at=100), "lookup": dict(unchanged=lookup),
                              "bad_row": dict(on_bad_row="error"), "worker": {}}[where]
    one = plan(tmp_path / "one", chunker, 1, **kwargs)
    three = plan(tmp_path / "three", chunker, 3, **kwargs)
    assert one[3] is not None and one[2], "fails after some windows"
    assert (type(three[3]), str(three[3])) == (type(one[3]), str(one[3]))
    assert three[:3] == one[:3]


CALLER = """
import os, sys, time
from pipeline.chunking import Chunker, ModelTokenizer
from pipeline.job.sections import ChunkingConfig
from pipeline.plan.parallel import Ahead
from pipeline.plan.processes import ChunkPool
from pipeline.records import Document

if __name__ == "__main__":
    tok = ModelTokenizer.from_model_dir(sys.argv[1], "mean")
    pool = ChunkPool(Chunker(tok, ChunkingConfig(), 512), "fp", 2)
    futures = [pool.submit([Ahead(Document(f"d{i}", "some text", "s"), "", False)])
               for i in range(4)]
    [f.result() for f in futures]
    print(*pool.pool._processes, flush=True)
    time.sleep(120)
"""


def test_the_workers_end_when_their_caller_is_killed(tmp_path: Path, minilm_dir: Path) -> None:
    """A SIGKILLed run (the fault tests kill at every fault point) leaves no worker behind."""
    script = tmp_path / "caller.py"
    script.write_text(CALLER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    caller = subprocess.Popen([sys.executable, str(script), str(minilm_dir)], env=env,
                              stdout=subprocess.PIPE, text=True)
    assert caller.stdout is not None
    pids = [int(p) for p in caller.stdout.readline().split()]
    assert len(pids) == 2
    caller.kill()
    caller.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(map(_alive, pids)):
        time.sleep(0.2)
    left = [p for p in pids if _alive(p)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left


def _alive(pid: int) -> bool:
    """Running (an exited process that nobody reaped yet is a zombie: gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False
