"""The sinks alone: how many chunks a second each destination takes from the run's one writer.

On N GPUs one writer thread in the run's process writes what every worker embeds, so the
sink's rate is a ceiling on scaling that no GPU count lifts. This measures it without a GPU:
the product's own sink (built from its settings, as ``embed-job run`` builds it) gets
``--rows`` unit vectors of each ``--dims`` with stored text of ``--text-bytes`` (about the
text of one bench chunk) in batches of ``--batch`` rows, exactly as the writer calls it
(``on_write_start``, ``write`` per batch, ``on_write_complete``); then ``count`` must equal
the rows written. One JSON line per sink and dimension: rows/s (first write to the last
acknowledgement), the share of that time the bench process itself was on a CPU (the
client's packing; the rest is the destination's), MB/s of vectors, the tokens/s that rate carries at ``--tokens-per-chunk``
(551: the bench corpus's mean chunk), and that over the demand of eight H200s at SGLang FP8
(8 x 92K tokens/s), so ``headroom_8xH200`` below 1 names the sink as the limit.

    python3 bench/sink_bench.py [--sinks parquet,milvus-lite,milvus-server] [--dims 1024,2560]

``milvus-server`` starts the PyPI ``milvus`` package's server on a throwaway data dir inside a
private network namespace (the script runs itself again under ``unshare -n``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

H200_FP8_TOKENS_PER_S = 92_000   # one H200, SGLang FP8, the command (docs/benchmarks.md)
SETTINGS = {
    "parquet": {"kind": "parquet", "path": "out/parquet", "store_text": True},
    "milvus-lite": {"kind": "milvus", "uri": "out/bench.db", "collection": "bench",
                    "store_text": True},
    "milvus-server": {"kind": "milvus", "collection": "bench", "store_text": True},
}


def batches(rows: int, batch: int, dim: int, text_bytes: int) -> list[Any]:
    """The batches, made before the clock starts (the writer gets them ready-made too)."""
    from pipeline.sinks.base import VectorBatch

    rng = np.random.default_rng(0)
    out = []
    for start in range(0, rows, batch):
        n = min(batch, rows - start)
        v = rng.standard_normal((n, dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        ids = range(start, start + n)
        out.append(VectorBatch(
            batch_id=f"b{start // batch}", pks=[f"doc{i}:0" for i in ids],
            doc_ids=[f"doc{i}" for i in ids], chunk_indexes=[0] * n,
            doc_hashes=[f"{i:016x}" for i in ids], vectors=v,
            texts=[f"chunk {i} ".ljust(text_bytes, "x") for i in ids],
            metadata=[{"title": f"title {i}", "section": "s"} for i in ids]))
    return out


def measure(kind: str, dim: int, args: argparse.Namespace, uri: str | None = None
            ) -> dict[str, Any]:
    from pipeline.job.plugins import sink_kinds
    from pipeline.sinks.base import GenerationMark

    raw = dict(SETTINGS[kind])
    if uri:
        raw["uri"] = uri
    settings = sink_kinds()[str(raw["kind"])].model_validate(raw)
    target = f"bench_d{dim}_{int(time.time())}"
    mark = GenerationMark(job="sink-bench", state_id="bench", fingerprint="f", generation=1)
    todo = batches(args.rows, args.batch, dim, args.text_bytes)
    with tempfile.TemporaryDirectory(prefix=f"sink-{kind}-") as tmp:
        sink = settings.make(lambda p: Path(tmp) / p, "bench", target, mark=mark)
        try:
            t0 = time.perf_counter()
            sink.on_write_start(dim)
            opened, cpu = time.perf_counter(), time.process_time()
            acked = [bid for b in todo for bid in sink.write(b)]
            acked += sink.on_write_complete()
            wall, cpu = time.perf_counter() - opened, time.process_time() - cpu
            count = sink.count()
        finally:
            sink.close()
    assert count == args.rows, f"{kind}: {count} rows stored, {args.rows} written"
    assert sorted(acked) == sorted(b.batch_id for b in todo), f"{kind}: acks {len(acked)}"
    rows_s = args.rows / wall
    tokens_s = rows_s * args.tokens_per_chunk
    return {"sink": kind, "dim": dim, "rows": args.rows, "batch": args.batch,
            "text_bytes": args.text_bytes, "open_s": round(opened - t0, 2),
            "write_s": round(wall, 2), "client_cpu_share": round(cpu / wall, 2),
            "rows_per_s": round(rows_s),
            "vector_mb_per_s": round(rows_s * dim * 4 / 1e6, 1),
            "tokens_per_s_carried": round(tokens_s),
            "headroom_8xH200": round(tokens_s / (8 * H200_FP8_TOKENS_PER_S), 2)}


def run_server(args: argparse.Namespace) -> int:
    """In the namespace: a server, then each dimension against it."""
    from milvus_server import serve_in_namespace

    def scenario(uri: str, _: Path) -> None:
        for dim in args.dims:
            print(json.dumps(measure("milvus-server", dim, args, uri)), flush=True)

    return serve_in_namespace(scenario, "sink bench server ok")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sinks", default="parquet,milvus-lite,milvus-server")
    p.add_argument("--dims", default="1024,2560", type=lambda s: [int(d) for d in s.split(",")])
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=119,
                   help="rows a batch: 65,536-token budget / 551-token chunks")
    p.add_argument("--text-bytes", type=int, default=2_400)
    p.add_argument("--tokens-per-chunk", type=float, default=551.5)
    p.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.in_namespace:
        return run_server(args)
    for kind in args.sinks.split(","):
        if kind == "milvus-server":
            rc = subprocess.run(["unshare", "-n", sys.executable, __file__, *sys.argv[1:],
                                 "--in-namespace"]).returncode
            if rc:
                return rc
            continue
        for dim in args.dims:
            print(json.dumps(measure(kind, dim, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
