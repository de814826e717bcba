"""Embedding with SGLang's offline ``Engine``: the GPU throughput backend.

The contract used (checked in the sglang 0.5.17 source, ``srt/entrypoints/engine.py`` and
``srt/managers/{io_struct,tokenizer_manager}.py``):

- ``Engine(**kwargs)`` builds a ``ServerArgs`` dataclass from the kwargs (an unknown one is a
  TypeError) and spawns the scheduler/detokenizer processes; ``engine.loop`` is its asyncio loop.
- ``Engine.encode``/``async_encode`` take text only (``prompt``), so token ids go in as
  ``EmbeddingReqInput(input_ids=[[...], ...])`` through ``engine.tokenizer_manager.
  generate_request(obj, None)``, an async generator whose first item is, for a list of
  sequences, a list of ``{"embedding": [...], "meta_info": {...}}`` in input order.
  ``input_ids[0]`` must be a ``list`` for the input to count as a batch.
- A sequence is rejected (ValueError, before anything reaches the scheduler) when its length
  is >= the context length, so at most ``context_length - 1`` tokens fit.
- Vectors come back L2-normalized from bf16 activations (norms 0.998-1.002).
- ``shutdown()`` kills every child process of this process (``kill_process_tree``).
- ``TokenizerManager.auto_create_handle_loop`` starts its result-receiving task on the loop
  that runs the first request (``asyncio.get_running_loop()``), adds signal handlers only when
  that is the main thread, and its locks/conditions bind to a loop on first use: so the
  engine's loop may run on a thread of its own, as long as every request goes through it.

Here ``engine.loop`` runs forever on a dedicated thread and requests are handed to it with
``asyncio.run_coroutine_threadsafe``: results are received (and the next requests sent) while
the caller is busy with the previous batch, not only while it waits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from pipeline.embedders.base import Embedder, T, model_name
from pipeline.embedders.sglang_backend import SGLangBackend
from pipeline.job.model_info import ModelInfo


class _LoopThread:
    """Runs an asyncio loop forever on a daemon thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._thread = threading.Thread(target=self._run, name="embed-job-sglang-loop",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Any) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)


class SGLangEmbedder(Embedder):
    """One ``sglang.Engine`` for the embedder's lifetime, fed token ids, many batches in flight.

    Any failure of the engine (start, a rejected batch, a malformed result) shuts it down and
    raises RuntimeError: a half-working engine holding the GPU is worse than a clear stop.
    """

    def __init__(self, settings: SGLangBackend, info: ModelInfo) -> None:
        import sglang
        from sglang.srt.managers.io_struct import EmbeddingReqInput

        cfg = settings.sglang
        kwargs = settings.engine_kwargs(info)
        self._request_cls = EmbeddingReqInput
        self._name = model_name(info.path)
        self._native_dim = info.hidden_size
        self._max_context = settings.max_context(info)
        self.max_in_flight = cfg.max_in_flight
        self.max_tokens_in_flight = cfg.max_tokens_in_flight
        self._tasks: set[asyncio.Task[np.ndarray]] = set()  # touched on the loop thread only
        self._loop_thread: _LoopThread | None = None
        try:
            self._engine: Any = sglang.Engine(**kwargs)
        except Exception as e:
            # Engine() may have spawned the scheduler before failing, and there is no engine
            # object to shut down: kill what it left, as SGLang's own shutdown would.
            from sglang.srt.utils import kill_process_tree

            kill_process_tree(os.getpid(), include_parent=False)
            raise RuntimeError(f"SGLang engine failed to start for {info.path}: "
                               f"{type(e).__name__}: {e}") from e
        if cfg.warmup_tokens:
            self._warm_up(min(cfg.warmup_tokens, self.max_context))

    @property
    def name(self) -> str:
        return self._name

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def native_dim(self) -> int:
        return self._native_dim

    def embed_batch(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        return self._collect(self._submit(batch), len(batch))

    def embed_stream(self, batches: Iterable[tuple[T, Sequence[Sequence[int]]]]
                     ) -> Iterator[tuple[T, np.ndarray]]:
        """Keep batches submitted until ``max_tokens_in_flight`` tokens (or ``max_in_flight``
        batches) are with the engine; yield them in submission order.

        The engine's loop runs on its own thread, so the scheduler gets new requests and
        results come back while the caller handles the previous batch.
        """
        self._live_engine()
        window: deque[tuple[T, int, int, concurrent.futures.Future]] = deque()
        tokens = 0
        try:
            for key, batch in batches:
                n_tokens = sum(len(seq) for seq in batch)
                window.append((key, len(batch), n_tokens, self._submit(batch)))
                tokens += n_tokens
                while window and (len(window) >= self.max_in_flight
                                  or tokens >= self.max_tokens_in_flight):
                    key, n, n_tokens, fut = window.popleft()
                    tokens -= n_tokens
                    yield key, self._collect(fut, n)
            while window:
                key, n, _, fut = window.popleft()
                yield key, self._collect(fut, n)
        finally:  # the caller stopped early or a batch failed: drop what is still in flight
            if self._engine is not None:
                self._cancel()

    def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is None:
            return
        if self._loop_thread is not None:
            self._cancel_on(self._loop_thread)
            self._loop_thread.stop()
            self._loop_thread = None
        engine.shutdown()

    def _warm_up(self, longest: int) -> None:
        """One batch of dummy sequences, long to short: on a fresh machine SGLang's triton
        kernels compile on first use (about a minute on an H100), which belongs to start-up,
        not to the first batches' throughput."""
        lengths = sorted({longest, min(longest, 1024), min(longest, 128), min(longest, 16)},
                         reverse=True)
        try:
            self.embed_batch([[0] * n for n in lengths])
        except RuntimeError as e:
            raise RuntimeError(f"SGLang engine warm-up failed: {e}") from e

    def _live_engine(self) -> Any:
        if self._engine is None:
            raise RuntimeError(f"SGLang embedder for {self.name} is closed")
        return self._engine

    def _submit(self, batch: Sequence[Sequence[int]]) -> concurrent.futures.Future:
        self._live_engine()  # before the coroutine exists: a closed embedder leaves none unawaited
        return self._on_loop(self._embed(_id_lists(batch)))

    def _on_loop(self, coro: Any) -> concurrent.futures.Future:
        """Schedule a coroutine on the engine's loop, started on its thread on first use."""
        if self._loop_thread is None:
            self._loop_thread = _LoopThread(self._live_engine().loop)
        return self._loop_thread.submit(coro)

    async def _embed(self, ids: list[list[int]]) -> np.ndarray:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if not ids:
                return np.zeros((0, self.native_dim), dtype=np.float32)
            engine = self._live_engine()
            responses = engine.tokenizer_manager.generate_request(
                self._request_cls(input_ids=ids), None)
            try:
                out = await responses.__anext__()
            finally:
                await responses.aclose()
            return self._check(out, len(ids))
        finally:
            self._tasks.discard(task)

    def _check(self, out: Any, n: int) -> np.ndarray:
        """Turn the engine's answer into an (n, native_dim) float32 array, or say what is wrong."""
        if not isinstance(out, list) or len(out) != n:
            got = f"{len(out)} results" if isinstance(out, list) else type(out).__name__
            raise ValueError(f"expected {n} results, got {got}")
        rows = []
        for i, item in enumerate(out):
            if not isinstance(item, dict):
                raise ValueError(f"sequence {i}: got a {type(item).__name__}, not a result dict")
            reason = (item.get("meta_info") or {}).get("finish_reason")
            if isinstance(reason, dict) and reason.get("type") == "abort":
                raise ValueError(f"sequence {i} aborted: {reason.get('message', reason)}")
            vector = item.get("embedding")
            if vector is None or len(vector) != self.native_dim:
                size = "no embedding" if vector is None else f"dimension {len(vector)}"
                raise ValueError(f"sequence {i}: {size}, expected dimension {self.native_dim}")
            rows.append(vector)
        vectors = np.asarray(rows, dtype=np.float32)
        if not np.isfinite(vectors).all():
            bad = np.unique(np.nonzero(~np.isfinite(vectors))[0]).tolist()
            raise ValueError(f"non-finite values in sequence(s) {bad[:10]}")
        return vectors

    def _collect(self, fut: concurrent.futures.Future, n: int) -> np.ndarray:
        """Wait for one batch's result (the engine works on the others meanwhile)."""
        try:
            return fut.result()
        except Exception as e:
            self.close()
            raise RuntimeError(f"SGLang failed on a batch of {n} sequences (engine shut down): "
                               f"{type(e).__name__}: {e}") from e

    def _cancel(self) -> None:
        if self._loop_thread is not None:
            self._cancel_on(self._loop_thread)

    def _cancel_on(self, loop_thread: _LoopThread) -> None:
        """Cancel every request still in flight and wait until each has finished unwinding."""
        async def cancel_all() -> None:
            pending = [t for t in self._tasks if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

        try:
            loop_thread.submit(cancel_all()).result(timeout=60)
        except Exception:  # noqa: BLE001 - cleanup must not hide the error being handled
            pass


def _id_lists(batch: Sequence[Sequence[int]]) -> list[list[int]]:
    """Lists of Python ints: SGLang tells a batch from one sequence by
    ``isinstance(input_ids[0], list)``. Plan batches already are (``to_pylist``): kept as is."""
    out = []
    for seq in batch:
        if type(seq) is list and (not seq or type(seq[0]) is int):
            out.append(seq)
        elif hasattr(seq, "tolist"):
            out.append(seq.tolist())
        else:
            out.append([int(t) for t in seq])
    return out
