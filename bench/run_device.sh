#!/usr/bin/env bash
# The GPU benchmarks, as run on the device machine (H100), from the repository root:
#
#   bash bench/run_device.sh [transformers] [rss] [workers] [ray] [cli] [plan] [tf-fp8] [fp8-all]
#                            [sglang | bf16 fp8 awq]
#
# fp8 is SGLang's online FP8; tf-fp8 the transformers backend's model.quantization: fp8 beside
# its bf16 (bench/gpu_fp8.py); fp8-all both, SGLang's raw engine only (BENCH_STAGES_FP8=raw):
# transformers bf16, transformers fp8 and SGLang fp8 side by side in one call (~8-9 minutes).
# Needs: the SGLang bundle (shared/sglang-device/, or a copy of its activate.sh and archive in
# .sgl/, carried) for SGLang
# and for pydantic; wheels in .whl/ for what the device lacks (datasets, multiprocess). plan
# needs no GPU nor SGLang: .bench-data/ (bench/plan_corpus.py, carried) and pydantic's wheels.
# Writes setup.log, transformers.log, tf-fp8.log (+ trace-fp8.json.gz), sglang.log, results.jsonl
# and table.md to $OUT
# (default bench/out) and prints the table last.
set -u
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
what="${*:-transformers bf16}"  # all of it: "transformers bf16", then "fp8 awq" (10 min a call)
case " $what " in *" fp8-all "*)
  what="$what tf-fp8 fp8"; BENCH_STAGES_FP8="${BENCH_STAGES_FP8:-raw}"
  BENCH_LIMIT_TF_FP8="${BENCH_LIMIT_TF_FP8:-280}"; BENCH_LIMIT_FP8="${BENCH_LIMIT_FP8:-190}";; esac
T0=$(date +%s)

{
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/bench-site .whl/*.whl && export PYTHONPATH="/tmp/bench-site${PYTHONPATH:+:$PYTHONPATH}"
fi
# Ray for --runner ray: .ray/ray-trim.tar.xz (the ray wheel unpacked, its Java jars, dashboard
# client and RL/serve/tune/train libraries left out and the binaries stripped, to travel in 19 MB)
if [ -f .ray/ray-trim.tar.xz ]; then
  mkdir -p /tmp/bench-site && tar -xJf .ray/ray-trim.tar.xz -C /tmp/bench-site && \
    export PYTHONPATH="/tmp/bench-site${PYTHONPATH:+:$PYTHONPATH}"
fi
# the bundle's activate.sh + archive: shared/sglang-device (where it travels) or a copy in .sgl/
ACT="$(ls .sgl/activate.sh shared/sglang-device/activate.sh ../shared/sglang-device/activate.sh 2>/dev/null | head -1)"
if [ -n "$ACT" ]; then
  # shellcheck disable=SC1090
  source "$ACT" "$(dirname "$ACT")/sglang-bundle.tar.xz" || echo "activate failed"
else
  echo "no SGLang bundle (.sgl/ or shared/sglang-device/): SGLang runs will fail"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import sys, torch, transformers, pyarrow; print(sys.version.split()[0], torch.__version__, transformers.__version__, pyarrow.__version__)"
echo "setup took $(( $(date +%s) - T0 ))s"
} > "$OUT/setup.log" 2>&1
cat "$OUT/setup.log" | tail -5

# run "$@" in its own process group, killed whole (SGLang's scheduler included) after $1 s
run_group() {
  local limit=$1; shift
  setsid "$@" &
  local pid=$! t=0
  while kill -0 "$pid" 2>/dev/null && [ "$t" -lt "$limit" ]; do sleep 1; t=$((t + 1)); done
  if kill -0 "$pid" 2>/dev/null; then echo "TIMEOUT after ${limit}s: $*"; kill -9 -- "-$pid" 2>/dev/null; fi
  wait "$pid" 2>/dev/null
  local rc=$?
  kill -9 -- "-$pid" 2>/dev/null  # anything the run left behind
  return $rc
}

# bench_script WORD SCRIPT LIMIT ARGS: one bench process, time-boxed, its RESULT lines shown
bench_script() {
  local word=$1 script=$2 limit=$3
  # shellcheck disable=SC2086  # ARGS is a list of options
  run_group "$limit" python3 "$script" --out "$OUT" --deadline "$(( limit - 30 ))" $4 \
    > "$OUT/$word.log" 2>&1
  echo "$word rc=$? after $(( $(date +%s) - T0 ))s"
  grep "^RESULT" "$OUT/$word.log" | cut -c1-300
}

case " $what " in *" transformers "*)
  bench_script transformers bench/gpu_transformers.py "${BENCH_LIMIT_TF:-360}" "${BENCH_TF_ARGS:-}"
  ;; esac

# model.quantization: fp8, transformers backend: bf16 and fp8 packed paths in one process, a
# profile of both, embed-job run with the fp8 job, and fp8 quality on all-MiniLM-L6-v2 where it
# travelled (carry .bench-data/minilm-demo.tar.xz, bench/minilm_trim.py; pydantic in .whl)
case " $what " in *" tf-fp8 "*)
  bench_script tf-fp8 bench/gpu_fp8.py "${BENCH_LIMIT_TF_FP8:-300}" "${BENCH_TF_FP8_ARGS:-}"
  ;; esac

case " $what " in *" rss "*)
  run_group "${BENCH_LIMIT_RSS:-420}" python3 bench/rss_scaling.py --device cuda \
    --copies "${BENCH_RSS_COPIES:-1,10}" --out "$OUT/rss.jsonl" > "$OUT/rss.log" 2>&1
  echo "rss rc=$? after $(( $(date +%s) - T0 ))s"
  tail -6 "$OUT/rss.log"
  ;; esac

# the planner alone, by process count: read + tokenize + chunk + plan written, real zh/en text
# and the real Qwen3 tokenizer (carry .bench-data); one JSON line each in plan.jsonl
case " $what " in *" plan "*)
  run_group "${BENCH_LIMIT_PLAN:-540}" python3 bench/plan_bench.py --data .bench-data \
    --processes "${BENCH_PLAN_PROCESSES:-1,4,8,16}" --tokens "${BENCH_PLAN_TOKENS:-50e6}" \
    --out "$OUT/plan.jsonl" > "$OUT/plan.log" 2>&1
  echo "plan rc=$? after $(( $(date +%s) - T0 ))s"
  grep "^\[bench" "$OUT/plan.log" | tail -6
  ;; esac

# the command itself in fresh processes, variants side by side (bench/cli_workers.py):
# cli_variants WORD VARIANTS LIMIT BACKENDS; exactly-once is checked on each output
cli_variants() {
  local word=$1 variants=$2 limit=$3 b
  for b in $4; do
    run_group "$limit" python3 bench/cli_workers.py --backend "$b" --variants "$variants" \
      --mode "${BENCH_CLI_MODE:-bf16}" \
      --copies "${BENCH_COPIES:-2}" --out "$OUT" --deadline "$(( limit - 20 ))" \
      > "$OUT/$word-$b.log" 2>&1
    echo "$word $b rc=$? after $(( $(date +%s) - T0 ))s"
    grep "^RESULT" "$OUT/$word-$b.log" | cut -c1-700
  done
}

# every GPU of the host: the command with --gpus 1 and --gpus all (GPU count: BENCH_GPUS, else
# nvidia-smi); on one GPU, one engine in the run's process beside two workers sharing it
case " $what " in *" workers "*)
  gpus="${BENCH_GPUS:-$(nvidia-smi -L | grep -c '^GPU ')}"
  variants="gpus=1,gpus=all"; [ "$gpus" -le 1 ] && variants="plain,gpus=1:workers=2"
  cli_variants workers "${BENCH_VARIANTS:-$variants}" "${BENCH_LIMIT_WORKERS:-300}" \
    "${BENCH_WORKERS_BACKENDS:-sglang transformers}"
  ;; esac

# the Ray runner: --runner ray (a local cluster of the host, one GPU actor) beside the local
# command (carry .ray, and .whl with jsonschema, referencing, jsonschema-specifications, rpds-py)
case " $what " in *" ray "*)
  cli_variants ray "plain,runner=ray" "${BENCH_LIMIT_RAY:-300}" "${BENCH_RAY_BACKENDS:-sglang}"
  ;; esac

# the command alone, one variant a backend (BENCH_CLI_MODE=fp8: SGLang's online FP8, or the
# transformers backend's model.quantization: fp8)
case " $what " in *" cli "*)
  cli_variants cli "${BENCH_VARIANTS:-plain}" "${BENCH_LIMIT_CLI:-300}" "${BENCH_CLI_BACKENDS:-transformers}"
  ;; esac

modes=""
for m in bf16 fp8 awq; do case " $what " in *" $m "*) modes="$modes $m";; esac; done
case " $what " in *" sglang "*) [ -z "$modes" ] && modes="bf16 fp8 awq";; esac
for m in $modes; do
  stages="raw,pipeline,long_32k,stream"
  [ "$m" = fp8 ] && stages="raw,pipeline"
  [ "$m" = awq ] && stages="raw"
  extra=""
  case "$m" in bf16) stages="${BENCH_STAGES_BF16:-$stages}"; extra="${BENCH_ARGS_BF16:-}";;
               fp8) stages="${BENCH_STAGES_FP8:-$stages}"; extra="${BENCH_ARGS_FP8:-}";; esac
  case "$m" in bf16) limit="${BENCH_LIMIT_BF16:-220}";; fp8) limit="${BENCH_LIMIT_FP8:-170}";;
               *) limit="${BENCH_LIMIT_AWQ:-150}";; esac  # (never name variables SGL_*: SGLang reads them)
  echo "==== sglang $m" >> "$OUT/sglang.log"
  run_group "$limit" python3 bench/gpu_sglang.py --mode "$m" --out "$OUT" --stages "$stages" \
    --deadline "$(( limit - 15 ))" $extra >> "$OUT/sglang.log" 2>&1
  echo "sglang $m rc=$? after $(( $(date +%s) - T0 ))s"
done
grep "^RESULT" "$OUT/sglang.log" 2>/dev/null | cut -c1-260

[ -s "$OUT/results.jsonl" ] && python3 bench/table.py "$OUT/results.jsonl" | tee "$OUT/table.md"
echo "total $(( $(date +%s) - T0 ))s"
