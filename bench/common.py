"""Shared pieces of the benchmarks: the synthetic corpus, the model directory, measurements.

The corpus is the one ``shared/sglang-device/smoke.py`` measured the raw engine with: 3000
documents of log-normal length (median 350 tokens, sigma 1, clipped to [16, 8192]), random
token ids below 151643, each ending in <|endoftext|> (151643); seed 0 gives the same token ids.

The pipeline reads *text*, so the documents are also written as text that a real tokenizer
turns back into exactly those ids: a word-level tokenizer whose vocabulary is the 151643
words ``t0 .. t151642`` plus ``<|endoftext|>`` (id 151643, appended after every sequence, as
Qwen3-Embedding's tokenizer is used). A document of L tokens is the L-1 words of its ids, so
the chunker produces one chunk per document with exactly the smoke corpus's tokens.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

EOS = 151643
VOCAB_WORDS = 151643
FLOP_PER_TOKEN = 7.73e9      # Qwen3-Embedding-4B shape on this corpus (issue 4)
PEAK_FLOPS = 989e12          # H100 SXM dense bf16
HIDDEN = 2560

QWEN3_EMBEDDING_4B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": EOS,
    "eos_token_id": EOS,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": HIDDEN,
    "initializer_range": 0.02,
    "intermediate_size": 9728,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "use_sliding_window": False,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 151665,
}
AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
              "version": "gemm", "modules_to_not_convert": None}


def make_docs(n: int, seed: int = 0, median: int = 350, sigma: float = 1.0, lo: int = 16,
              hi: int = 8192) -> list[list[int]]:
    """Exactly smoke.py's corpus: token id lists ending in EOS."""
    rng = np.random.default_rng(seed)
    lens = np.clip(np.round(rng.lognormal(math.log(median), sigma, size=n)), lo, hi).astype(int)
    docs = []
    for length in lens:
        ids = rng.integers(0, EOS, size=int(length) - 1).tolist()
        ids.append(EOS)
        docs.append(ids)
    return docs


def doc_text(ids: list[int]) -> str:
    """The text that the bench tokenizer turns into ``ids`` (EOS is added by the tokenizer)."""
    return " ".join(f"t{i}" for i in ids[:-1])


def write_tokenizer(model_dir: Path) -> None:
    """A word-level fast tokenizer with the model's vocabulary size and EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB_WORDS)}
    vocab["<|endoftext|>"] = EOS
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", EOS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", padding_side="left",
                                   model_max_length=40960)
    fast.save_pretrained(model_dir)


def write_model_dir(path: Path, quant: str | None = None, config: dict[str, Any] | None = None,
                    tokenizer: bool = True) -> Path:
    """config.json of the Qwen3-Embedding-4B shape (no weights: SGLang loads them as 'dummy',
    the transformers bench initializes them at random) and the bench tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(config or QWEN3_EMBEDDING_4B)
    if quant == "awq":
        cfg["quantization_config"] = dict(AWQ_CONFIG)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer and not (path / "tokenizer.json").exists():
        write_tokenizer(path)
    return path


def random_model_for(model_dir: Path, device: Any) -> Any:
    """Random bf16 weights of ``model_dir``'s config, built on ``device`` (seed 0), and served by
    every ``AutoModel.from_pretrained(model_dir)`` from now on, so the product's own loading
    path runs without 8 GB of weights written to disk and read back."""
    import torch
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModel.from_config(AutoConfig.from_pretrained(model_dir),
                                      dtype=torch.bfloat16).eval()
    model.to(torch.bfloat16)
    original = AutoModel.from_pretrained

    def from_pretrained(path: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(path).resolve() == model_dir.resolve():
            return model
        return original(path, *args, **kwargs)

    AutoModel.from_pretrained = from_pretrained  # type: ignore[method-assign]
    return model


def write_corpus(path: Path, docs: list[list[int]], copies: int = 1) -> Path:
    """The documents as a Parquet file (id, text); ``copies`` repeats the corpus under new ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    texts = [doc_text(d) for d in docs]
    with pq.ParquetWriter(path, pa.schema([("id", pa.string()), ("text", pa.string())])) as w:
        for c in range(copies):
            w.write_table(pa.table({"id": [f"c{c}-d{i}" for i in range(len(docs))],
                                    "text": texts}))
    return path


# ---------------------------------------------------------------- measurements

def rss_peak_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_now_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def mfu(tokens_per_s: float) -> float:
    return tokens_per_s * FLOP_PER_TOKEN / PEAK_FLOPS


class Results:
    """Rows of the final table, also appended to a JSON-lines file as they come."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, **row: Any) -> dict[str, Any]:
        row.setdefault("time", time.strftime("%H:%M:%S"))
        if "tokens_per_s" in row and row.get("tokens_per_s"):
            row.setdefault("mfu", round(mfu(row["tokens_per_s"]), 4))
        self.rows.append(row)
        print("RESULT " + json.dumps(row, default=str), flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row, default=str) + "\n")
        return row


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Stages:
    """The stages a bench process runs: those chosen (None: all), each only if it fits before
    the deadline, each failure recorded as a row and survived, so one call measures the rest."""

    def __init__(self, res: Results, chosen: set[str] | None, deadline: float, start: float,
                 prefix: str = "", after_error: Any = None) -> None:
        """``deadline``: seconds after ``start`` (``time.monotonic()`` at the process's
        start) by which every stage must be done."""
        self.res, self.chosen, self.deadline, self.t0 = res, chosen, deadline, start
        self.prefix, self.after_error = prefix, after_error

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.deadline - self.elapsed()

    def want(self, name: str, need_s: float) -> bool:
        """Is stage ``name`` (``stage`` or ``stage:part``) chosen, with ``need_s`` left?"""
        if self.chosen is not None and name.split(":")[0] not in self.chosen:
            return False
        if self.elapsed() + need_s > self.deadline:
            log(f"skip {name}: {self.elapsed():.0f}s used, needs ~{need_s:.0f}s of "
                f"{self.deadline:.0f}")
            self.res.add(stage=name, skipped=f"deadline ({self.elapsed():.0f}s used)")
            return False
        return True

    def guarded(self, name: str, fn: Any) -> Any:
        """``fn()``, or None after recording its error."""
        t = time.monotonic()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - record and go on
            traceback.print_exc()
            self.res.add(stage=f"{self.prefix}{name}", error=f"{type(e).__name__}: {str(e)[:400]}",
                         seconds=round(time.monotonic() - t, 1))
            if self.after_error is not None:
                self.after_error()
            return None


def import_datasets_or_stub() -> None:
    """``pipeline.readers`` imports ``datasets`` for its hf reader; the bench reads Parquet.
    Where the wheel did not travel, a stub lets the import succeed (and would fail loudly if
    an hf source were used)."""
    try:
        import datasets  # noqa: F401
    except Exception as e:  # noqa: BLE001
        import sys
        import types

        log(f"datasets unavailable ({type(e).__name__}: {e}); stubbing it (Parquet input only)")
        mod = types.ModuleType("datasets")

        class _Missing:
            def __getattr__(self, name: str) -> Any:
                raise ImportError("datasets is not installed")

        mod.Dataset = mod.IterableDataset = type("Dataset", (), {})
        exc = types.ModuleType("datasets.exceptions")
        exc.DatasetsError = type("DatasetsError", (Exception,), {})
        pm = types.ModuleType("datasets.packaged_modules")
        pm._PACKAGED_DATASETS_MODULES = {}
        sys.modules.update({"datasets": mod, "datasets.exceptions": exc,
                            "datasets.packaged_modules": pm})
