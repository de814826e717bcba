"""Print the benchmark table from the JSON lines the GPU benches wrote.

    python bench/table.py bench/out/results.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import mfu  # noqa: E402

THROUGHPUT = [
    ("naive_unsorted_b8", "transformers sdpa, unsorted, padded, batch 8 (naive script)"),
    ("sorted_padded_32k", "transformers sdpa, length-sorted, padded, 32K-token budget"),
    ("packed_nocompile_32k", "transformers backend, packed (varlen flash), no compile"),
    ("packed_compile_stream", "**transformers backend, packed + torch.compile** (embed_stream)"),
    ("pipeline_transformers", "**embed-job run**, transformers backend, end to end"),
    ("bf16:raw_engine", "SGLang 0.5.17 raw engine, bf16"),
    ("bf16:embedder_stream", "SGLangEmbedder.embed_stream, bf16"),
    ("bf16:pipeline", "**embed-job run**, SGLang bf16, end to end (engine lent, warm)"),
    ("bf16:cli", "**`embed-job run` command**, SGLang bf16, fresh process, after start-up"),
    ("bf16:cli_x5", "**`embed-job run` command**, SGLang bf16, 5x corpus, fresh process, after start-up"),
    ("fp8:raw_engine", "SGLang raw engine, fp8 (online, from bf16)"),
    ("fp8:pipeline", "**embed-job run**, SGLang fp8, end to end (engine lent, warm)"),
    ("fp8:cli", "**`embed-job run` command**, SGLang fp8, fresh process, after start-up"),
    ("awq:raw_engine", "SGLang raw engine, AWQ 4-bit -> awq_marlin"),
]


def load(path: Path) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row.get("stage", "?")] = row  # the last run of a stage wins
    return rows


def fmt(x: Any, spec: str = ",.0f", suffix: str = "") -> str:
    return "—" if x is None else f"{x:{spec}}{suffix}"


FP8_ROWS = [
    ("tf_bf16:stream", "transformers backend, packed + compile, bf16"),
    ("tf_fp8:stream", "**transformers backend, packed + compile, `model.quantization: fp8`**"),
    ("tf_bf16_inductor:stream", "bf16 without the Triton kernels (Inductor's fusion)"),
    ("tf_fp8_inductor:stream", "fp8 without the Triton kernels (Inductor's fusion)"),
    ("tf_fp8_exact_accum:stream", "same, FP8 without fast accumulation"),
    ("tf_bf16:stream_2", "transformers bf16, again"),
    ("tf_fp8:stream_2", "transformers fp8, again"),
    ("tf_fp8:pipeline", "**embed-job run**, transformers fp8, end to end (vs the fp8 stream)"),
    ("fp8:raw_engine", "SGLang raw engine, fp8 (online, from bf16)"),
]


def fp8_section(rows: dict[str, dict[str, Any]]) -> None:
    """bench/gpu_fp8.py's rows: FP8 beside bf16 and SGLang FP8, the profile, the quality."""
    bf16 = (rows.get("tf_bf16:stream") or {}).get("tokens_per_s")
    sgl = (rows.get("fp8:raw_engine") or {}).get("tokens_per_s")
    own = (rows.get("tf_fp8:stream") or {}).get("tokens_per_s")
    measured = [(k, label) for k, label in FP8_ROWS if k in rows]
    if any(k in rows for k, _ in FP8_ROWS[:3]):
        print("| what | tokens/s | vs transformers bf16 | vs SGLang fp8 raw | vs 110K goal |")
        print("|---|---|---|---|---|")
        for key, label in measured:
            r = rows[key]
            if "error" in r or "skipped" in r:
                print(f"| {label} | {r.get('error') or r.get('skipped')} | | | |")
                continue
            tps = r.get("tokens_per_s")
            base = own if key == "tf_fp8:pipeline" else bf16  # e2e: against its own embedder
            print(f"| {label} | {fmt(tps)} | {fmt(tps / base if tps and base else None, '.3f')} | "
                  f"{fmt(tps / sgl if tps and sgl else None, '.3f')} | "
                  f"{fmt(tps / 110_000 if tps else None, '.3f')} |")
    print()
    if "tf_fp8:profile" in rows:
        from gpu_fp8 import print_profile

        print_profile({k: v for k, v in rows["tf_fp8:profile"].items() if isinstance(v, dict)})
        print()
    quality = rows.get("quality_minilm", {})
    if any(isinstance(v, dict) and "chunks" in v for v in quality.values()):
        from fp8_quality import print_table

        print_table(quality)
        print()


def main() -> int:
    rows = load(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/out/results.jsonl"))
    naive = (rows.get("naive_unsorted_b8") or {}).get("tokens_per_s")
    env = rows.get("env", {})
    print(f"GPU: {env.get('gpu', '?')}, torch {env.get('torch', '?')}, "
          f"transformers {env.get('transformers', '?')}; MFU = tokens/s x 7.73 GFLOP / 989 TFLOP/s")
    print()
    print("| what | tokens/s | MFU | padding waste | GPU memory | host RSS peak | vs naive | vs raw engine |")
    print("|---|---|---|---|---|---|---|---|")
    for key, label in THROUGHPUT:
        r = rows.get(key)
        if r is None:
            continue
        if "error" in r or "skipped" in r:
            print(f"| {label} | {r.get('error') or r.get('skipped')} | | | | | | |")
            continue
        tps = r.get("tokens_per_s")
        gpu = r.get("gpu_peak_gib")
        gpu_s = f"{gpu:.1f} GiB peak alloc" if gpu else (
            f"{r['gpu_used_gib']:.1f} GiB used (engine)" if r.get("gpu_used_gib") else "—")
        raw_key = key.split(":")[0] + ":raw_engine" if ":" in key else None
        raw = (rows.get(raw_key) or {}).get("tokens_per_s") if raw_key else None
        vs_raw = tps / raw if raw and tps and key != raw_key else None
        if key == "pipeline_transformers":
            ref = (rows.get("packed_compile_stream") or {}).get("tokens_per_s")
            vs_raw = tps / ref if ref else None
        print(f"| {label} | {fmt(tps)} | {fmt(mfu(tps) * 100 if tps else None, '.1f', '%')} | "
              f"{fmt((r.get('padding_waste') or 0) * 100, '.1f', '%')} | {gpu_s} | "
              f"{fmt(r.get('rss_peak_mib'), ',.0f', ' MiB')} | "
              f"{fmt(tps / naive if naive and tps else None, '.2f', 'x')} | "
              f"{fmt(vs_raw * 100 if vs_raw else None, '.1f', '%')} |")
    print()
    fp8_section(rows)
    for key in ("naive_unsorted_b32_longest_batch", "golden_bf16", "attention_check",
                "packed_compile_startup", "long_32k_packed", "long_32k_hf_sdpa_padded_path",
                "bf16:engine_start", "fp8:engine_start", "awq:engine_start", "bf16:long_32k",
                "bf16:import", "bf16:cli", "fp8:cli", "model_init"):
        if key in rows:
            r = {k: v for k, v in rows[key].items() if k not in ("stage", "time", "engine_kwargs")}
            print(f"- {key}: {json.dumps(r)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
