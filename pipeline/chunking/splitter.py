"""Documents into chunks whose token ids are exactly what the model embeds.

A document is tokenized once; each chunk is a slice of those ids plus the model's special
tokens. Re-tokenizing a chunk's text could give other ids (BPE merges across the cut), and
then the tokens counted for batching would not be the tokens embedded. So every cut, be it
a chunk's end, an overlapping chunk's start or the end of a slice a long document is
tokenized in, is chosen by one ranking, and the ones it trusts are word boundaries, where
tokenizing the text on either side alone gives the same ids: a chunk's stored text, embedded
again, gives its vector.
"""

from __future__ import annotations

import re

from tokenizers import Encoding

from pipeline.chunking.tokens import ModelTokenizer
from pipeline.errors import ConfigError
from pipeline.job.sections import ChunkingConfig
from pipeline.records import Chunk, DeadLetter, Document

EMPTY = "empty text after tokenization"

# Sentence ends: CJK ones stand alone, ASCII ones count only when whitespace follows.
_CJK_ENDS = frozenset("。！？；…")
_ASCII_ENDS = frozenset(".!?;")
# In text written without spaces, words end on both sides of a Han ideograph (BERT's
# WordPiece makes each one a word) and of CJK or fullwidth punctuation. Not of kana or
# Hangul: WordPiece keeps their runs as one word.
_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ceaf"
                  "\U0002f800-\U0002fa1f\u3001-\u3003\u3008-\u3011\u3014-\u301f\u3030\u303d"
                  "\uff01-\uff03\uff05-\uff0a\uff0c-\uff0f\uff1a-\uff1b\uff1f-\uff20\uff3b-\uff3d"
                  "\uff3f\uff5b\uff5d\uff5f-\uff65]")
# Characters looked at on each side of a boundary; bounded so that scanning stays linear
# even in a document that is one long run of whitespace.
_LOOK = 16
# Characters tokenized at a time: a whole document's encoding costs ~180 bytes a character.
_SLICE = 1 << 18

# How good a cut is, worst first. From _WORD up a cut is between words, never inside one.
_MID_CHAR, _TOKEN, _WORD, _SENTENCE, _LINE, _PARAGRAPH = range(6)


def _rank(text: str, offsets: list[tuple[int, int]], e: int) -> int:
    """Rank the cut just before token ``e`` (0 < e < number of tokens)."""
    p = offsets[e][0]
    if p < offsets[e - 1][1]:
        return _MID_CHAR  # byte-level pieces of one character share its offsets
    left = text[max(0, p - _LOOK):p]
    right = text[p:p + _LOOK]
    head = left.rstrip()
    trail = left[len(head):]
    if trail and offsets[e - 1][1] == p and not right[:1].isspace() \
            and len(re.split("[\r\n]", trail)[-1]) > 1:
        # Byte-level BPE (`\s+(?!\S)`) gives a run's last space a token of its own before a
        # digit; cut after it, the run would end the text and tokenize as one piece instead.
        return _TOKEN
    space = trail + right[:len(right) - len(right.lstrip())]
    newlines = space.count("\n")
    if newlines:
        return _PARAGRAPH if newlines > 1 else _LINE
    last = head[-1:]
    if last in _CJK_ENDS or (space and last in _ASCII_ENDS):
        return _SENTENCE
    return _WORD if space or _CJK.search(left[-1:] + right[:1]) else _TOKEN


def _best(text: str, offsets: list[tuple[int, int]], cuts: range) -> tuple[int, int]:
    """The first of the best-ranked ``cuts``, in their order, and its rank."""
    best, best_rank = cuts[0], -1
    for e in cuts:
        r = _rank(text, offsets, e)
        if r > best_rank:
            best, best_rank = e, r
            if r == _PARAGRAPH:
                break
    return best, best_rank


class _Tokens:
    """A document's ids and offsets, tokenized slice by slice as chunking reaches them.

    Only the current chunk's tokens and one slice are held, whatever the document's length.
    A slice ends at the best cut between its middle and 7/8 of its tokens, away from its own
    end, where a word may be cut short: there, the ranking trusts it as it trusts chunk ends.
    """

    def __init__(self, tokenizer: ModelTokenizer, text: str) -> None:
        self.tokenizer = tokenizer
        self.text = text
        self.ids: list[int] = []
        self._offsets: list[tuple[int, int]] = []
        # A document tokenized in one go: offsets are read only if it needs more than one chunk.
        self._whole: Encoding | None = None
        self.done = 0  # characters tokenized: the text up to the last slice's cut

    @property
    def complete(self) -> bool:
        return self.done == len(self.text)

    @property
    def offsets(self) -> list[tuple[int, int]]:
        if self._whole is not None:
            self._offsets, self._whole = self._whole.offsets, None
        return self._offsets

    def fill(self, keep: int, need: int) -> int:
        """Hold tokens up to index ``need`` (all, if the text ends first), forgetting those
        before ``keep``; returns how many were forgotten, by which every index moves down."""
        if len(self.ids) >= need or self.complete:
            return 0
        del self.ids[:keep], self.offsets[:keep]
        while len(self.ids) < need - keep and not self.complete:
            self._slice()
        return keep

    def _slice(self) -> None:
        text, a = self.text, self.done
        b = min(a + _SLICE, len(text))
        enc = self.tokenizer.encode(text[a:b])
        if a == 0 and b == len(text):
            self.ids, self._whole, self.done = enc.ids, enc, b
            return
        ids, offsets = enc.ids, [(x + a, y + a) for x, y in enc.offsets]
        m = len(ids)
        if b < len(text) and m > 1:
            k, rank = _best(text, offsets, range(m - 1 - m // 8, (m - 1) // 2, -1))
            if rank > _MID_CHAR and offsets[k][0] > a:  # else cut where the slice ends
                ids, b = ids[:k], offsets[k][0]
                del offsets[k:]
        self.ids += ids
        self._offsets += offsets
        self.done = b


class Chunker:
    """Split documents into chunks of at most ``min(max_tokens, max_context)`` tokens.

    Each chunk takes the largest window that fits, then backs off to the best boundary
    (blank line, line break, sentence end, word, token) in the window's second half, so
    that cuts fall between ideas without making chunks small. With overlap, the next chunk
    starts at the best boundary, word or better, in the last ``overlap_tokens`` of this one,
    or where this one ends if there is none: never inside a word.
    """

    def __init__(self, tokenizer: ModelTokenizer, config: ChunkingConfig, max_context: int) -> None:
        self.tokenizer = tokenizer
        self.over_length = config.over_length
        self.overlap = config.overlap_tokens
        self.limit = min(config.max_tokens, max_context)
        self.budget = self.limit - tokenizer.n_special
        if self.budget <= self.overlap:
            raise ConfigError(
                f"chunking.overlap_tokens: {self.overlap} leaves no room for new text in a "
                f"{self.limit}-token chunk ({tokenizer.n_special} of them special tokens)")
        # Never back off to a chunk of overlap_tokens or fewer: each chunk must move forward.
        self.min_body = max((self.budget + 1) // 2, self.overlap + 1)

    def chunk(self, doc: Document) -> list[Chunk] | DeadLetter:
        """The document's chunks in order, or why it cannot be embedded."""
        text = doc.text
        if not text or text.isspace():  # strip() would copy a huge text
            return DeadLetter(doc.doc_id, doc.source, reason=EMPTY)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return DeadLetter(doc.doc_id, doc.source, reason="text is not valid Unicode "
                              "(lone surrogate)")
        tokens = _Tokens(self.tokenizer, text)
        tokens.fill(0, self.budget + 1)  # enough to tell whether the document fits
        if not tokens.ids:
            return DeadLetter(doc.doc_id, doc.source, reason=EMPTY)
        if len(tokens.ids) > self.budget and self.over_length == "skip":
            return DeadLetter(doc.doc_id, doc.source,
                              reason=f"over length: more than max {self.limit} tokens")
        if len(tokens.ids) > self.budget and self.over_length == "truncate":
            return [self._make(doc, 0, tokens, 0, self.budget)]

        chunks: list[Chunk] = []
        s = 0
        while True:
            s -= tokens.fill(s, s + self.budget + 1)
            n = len(tokens.ids)
            if tokens.complete and n - s <= self.budget:
                chunks.append(self._make(doc, len(chunks), tokens, s, n))
                return chunks
            e = _best(text, tokens.offsets, range(s + self.budget, s + self.min_body - 1, -1))[0]
            chunks.append(self._make(doc, len(chunks), tokens, s, e))
            s = self._next_start(text, tokens.offsets, e)

    def _next_start(self, text: str, offsets: list[tuple[int, int]], e: int) -> int:
        """Start of the chunk after one that ends before token ``e``: the earliest of the best
        boundaries in its last ``overlap`` tokens, for the most overlap; else ``e`` itself.

        A start inside a word would store text that tokenizes (and embeds) otherwise.
        """
        if not self.overlap:
            return e
        s, rank = _best(text, offsets, range(e - self.overlap, e))
        return s if rank >= _WORD else e

    def _make(self, doc: Document, index: int, tokens: _Tokens, s: int, e: int) -> Chunk:
        """Chunk of tokens s..e-1; its span runs to the next token, so trailing space is kept."""
        start = 0 if index == 0 else tokens.offsets[s][0]
        end = len(doc.text) if tokens.complete and e == len(tokens.ids) else tokens.offsets[e][0]
        return Chunk(doc.doc_id, index, start, end, self.tokenizer.with_special(tokens.ids[s:e]))
