"""Builders for the small models the tests run: a random-weight Qwen3 embedding model.

It exercises the Qwen3 code path (last-token pooling, left padding, ``<|endoftext|>`` EOS,
query instruction, long context) without any download. Weights are random, so only
shape-level and invariance properties are testable with it; semantics use MiniLM.
"""

from __future__ import annotations

from pathlib import Path

EOS = "<|endoftext|>"

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Embeddings map text to vectors.",
    "Milvus stores vectors; Parquet stores columns. Batches are packed by token budget.",
    "Instruct: Given a web search query, retrieve relevant passages\nQuery:what is a vector?",
    "北京是中国的首都。上海是最大的城市！你知道吗？长江很长；黄河也很长。",
    "维基百科是一个自由的百科全书。它由志愿者编写，内容涵盖各个领域。",
    "Paragraphs are separated by blank lines.\n\nSentences end with periods. Or questions?",
] * 20


def build_tiny_qwen3(out: Path, vocab_size: int = 600, hidden: int = 64, layers: int = 2,
                     max_positions: int = 32768, seed: int = 0) -> Path:
    """Write a random Qwen3Model and a trained byte-level BPE tokenizer into ``out``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS,
                                   padding_side="left", model_max_length=max_positions)
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=hidden // 4, max_position_embeddings=max_positions,
                      eos_token_id=tok.token_to_id(EOS), pad_token_id=tok.token_to_id(EOS),
                      tie_word_embeddings=False)
    cfg.architectures = ["Qwen3Model"]
    Qwen3Model(cfg).eval().save_pretrained(out)
    return out
