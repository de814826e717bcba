"""The model's tokenizer, reduced to what chunking and embedding need: ids, offsets, special tokens.

Backends never tokenize (see ``pipeline.embedders.base``), so everything about how a text
becomes the ids a model computes on lives here: the special tokens around a sequence, the
EOS that last-token pooling reads, and the query instruction.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Encoding, Tokenizer

from pipeline.errors import ConfigError
from pipeline.job.model_info import Pooling

if TYPE_CHECKING:  # imported when used: a planner worker process never loads transformers
    from transformers import PreTrainedTokenizerBase

# Any short plain text works: only the ids added around it matter.
_PROBE = "hello world"


class ModelTokenizer:
    """A fast HF tokenizer plus the special tokens the model expects around every sequence."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pooling: Pooling,
                 source: bytes | None = None) -> None:
        """``source`` is the tokenizer file's bytes, hashed for :meth:`identity`.

        Without it the backend's serialization is hashed, which may change with the
        ``tokenizers`` version (and so invalidate a checkpoint) even when the ids do not.
        """
        if not tokenizer.is_fast:
            raise ConfigError(f"model.path: {tokenizer.name_or_path}: a fast (tokenizer.json) "
                              "tokenizer is needed for character offsets")
        self.hf = tokenizer
        self.eos_id: int | None = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

        # A private copy of the Rust tokenizer: tokenizer.json may carry truncation and fixed
        # padding (MiniLM's pads/truncates to 128), and documents are plain text, so a literal
        # "<|endoftext|>" or "[SEP]" in them is spelled out rather than read as a control token.
        self._backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._backend.no_truncation()
        self._backend.no_padding()
        self._backend.encode_special_tokens = True

        self.prefix_ids, self.suffix_ids = self._special_around(tokenizer)
        if pooling == "last":
            if self.eos_id is None:
                raise ConfigError(f"model.path: {tokenizer.name_or_path}: last-token pooling needs "
                                  "an EOS token and the tokenizer defines none")
            if self.suffix_ids[-1:] != [self.eos_id]:
                # The model was trained to embed at EOS; HF and SGLang may not append it.
                self.suffix_ids = [*self.suffix_ids, self.eos_id]
        self.n_special = len(self.prefix_ids) + len(self.suffix_ids)
        # The copy's serialization, not the wrapper's: HF calls change the wrapper's padding state.
        self._identity = self._hash(source if source is not None
                                    else self._backend.to_str().encode())

    @classmethod
    def from_model_dir(cls, path: Path, pooling: Pooling) -> ModelTokenizer:
        path = Path(path)
        tok_file = path / "tokenizer.json"
        source = tok_file.read_bytes() if tok_file.exists() else None
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(path), pooling, source)

    def __getstate__(self) -> dict[str, Any]:
        """A copy for a planner worker process (``pipeline.plan.parallel``): the Rust
        tokenizer and the special tokens, which are all that chunking uses; not the HF
        wrapper, so ``hf`` is None in the copy."""
        return {**self.__dict__, "hf": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        # the one setting the Rust tokenizer's own pickle (its JSON) does not carry
        self._backend.encode_special_tokens = True

    @staticmethod
    def _special_around(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
        """What the tokenizer itself adds around a text, found by diffing with and without."""
        plain = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
        full = tokenizer(_PROBE, add_special_tokens=True)["input_ids"]
        for i in range(len(full) - len(plain) + 1):
            if full[i:i + len(plain)] == plain:
                return full[:i], full[i + len(plain):]
        raise ConfigError(f"model.path: {tokenizer.name_or_path}: cannot tell the special tokens "
                          f"apart from the text ({full} vs {plain})")

    def _hash(self, source: bytes) -> str:
        h = hashlib.blake2b(source, digest_size=16)
        h.update(repr((self.prefix_ids, self.suffix_ids)).encode())
        return h.hexdigest()

    def identity(self) -> str:
        """Stable id for the job fingerprint: the tokenizer file and the special tokens added."""
        return self._identity

    def encode(self, text: str) -> Encoding:
        """The text's encoding without special tokens, from the Rust tokenizer directly: no
        truncation, no 'longer than the model max' warning, whatever the document's length.

        Its ids and offsets become Python lists only when read, so a caller can count tokens
        (``len``) without paying ~120 bytes a token for the offsets.
        """
        return self._backend.encode(text, add_special_tokens=False)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids without special tokens and each token's (start, end) character offsets."""
        enc = self.encode(text)
        return enc.ids, enc.offsets

    def with_special(self, body: list[int]) -> list[int]:
        """The ids the model computes on for a body of text ids."""
        return [*self.prefix_ids, *body, *self.suffix_ids]

    def query_ids(self, text: str, instruction: str | None) -> list[int]:
        """A query's ids; instruction-tuned models (Qwen3-Embedding) want the task stated.

        Documents are never given the instruction: only queries are.
        """
        if instruction:
            text = f"Instruct: {instruction}\nQuery:{text}"
        return self.with_special(self.encode_with_offsets(text)[0])
