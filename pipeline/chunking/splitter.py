"""Documents into chunks whose token ids are exactly what the model embeds.

A document is tokenized once; each chunk is a slice of those ids plus the model's special
tokens. Re-tokenizing a chunk's text could give other ids (BPE merges across the cut), and
then the tokens counted for batching would not be the tokens embedded.
"""

from __future__ import annotations

from pipeline.chunking.tokens import ModelTokenizer
from pipeline.config import ChunkingConfig
from pipeline.errors import ConfigError
from pipeline.records import Chunk, DeadLetter, Document

EMPTY = "empty text after tokenization"

# Sentence ends: CJK ones stand alone, ASCII ones count only when whitespace follows.
_CJK_ENDS = frozenset("。！？；…")
_ASCII_ENDS = frozenset(".!?;")
# Characters looked at on each side of a boundary; bounded so that scanning stays linear
# even in a document that is one long run of whitespace.
_LOOK = 16

# How good a cut is, worst first.
_MID_CHAR, _TOKEN, _SPACE, _SENTENCE, _LINE, _PARAGRAPH = range(6)


def _rank(text: str, offsets: list[tuple[int, int]], e: int) -> int:
    """Rank the cut just before token ``e`` (0 < e < number of tokens)."""
    p = offsets[e][0]
    if p < offsets[e - 1][1]:
        return _MID_CHAR  # byte-level pieces of one character share its offsets
    left = text[max(0, p - _LOOK):p]
    right = text[p:p + _LOOK]
    head = left.rstrip()
    space = left[len(head):] + right[:len(right) - len(right.lstrip())]
    newlines = space.count("\n")
    if newlines:
        return _PARAGRAPH if newlines > 1 else _LINE
    last = head[-1:]
    if last in _CJK_ENDS or (space and last in _ASCII_ENDS):
        return _SENTENCE
    return _SPACE if space else _TOKEN


class Chunker:
    """Split documents into chunks of at most ``min(max_tokens, max_context)`` tokens.

    Each chunk takes the largest window that fits, then backs off to the best boundary
    (blank line, line break, sentence end, whitespace, token) in the window's second half,
    so that cuts fall between ideas without making chunks small.
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
        if not text.strip():
            return DeadLetter(doc.doc_id, doc.source, reason=EMPTY)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return DeadLetter(doc.doc_id, doc.source, reason="text is not valid Unicode "
                              "(lone surrogate)")
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        n = len(ids)
        if n == 0:
            return DeadLetter(doc.doc_id, doc.source, reason=EMPTY)
        if n > self.budget and self.over_length == "skip":
            return DeadLetter(doc.doc_id, doc.source, reason=f"over length: "
                              f"{n + self.tokenizer.n_special} tokens > max {self.limit}")
        if n > self.budget and self.over_length == "truncate":
            return [self._make(doc, 0, ids, offsets, 0, self.budget)]

        chunks: list[Chunk] = []
        s = 0
        while True:
            e = n if n - s <= self.budget else self._cut(text, offsets, s)
            chunks.append(self._make(doc, len(chunks), ids, offsets, s, e))
            if e == n:
                return chunks
            s = e - self.overlap

    def _cut(self, text: str, offsets: list[tuple[int, int]], s: int) -> int:
        """End (exclusive token index) of the chunk starting at token ``s``: the latest
        best-ranked cut between ``s + min_body`` and ``s + budget``."""
        best, best_rank = s + self.budget, -1
        for e in range(s + self.budget, s + self.min_body - 1, -1):
            r = _rank(text, offsets, e)
            if r > best_rank:
                best, best_rank = e, r
                if r == _PARAGRAPH:
                    break
        return best

    def _make(self, doc: Document, index: int, ids: list[int], offsets: list[tuple[int, int]],
              s: int, e: int) -> Chunk:
        """Chunk of tokens s..e-1; its span runs to the next token, so trailing space is kept."""
        start = 0 if s == 0 else offsets[s][0]
        end = len(doc.text) if e == len(ids) else offsets[e][0]
        return Chunk(doc.doc_id, index, start, end, self.tokenizer.with_special(ids[s:e]))
