#!/usr/bin/env bash
# The prepared script for a lent GPU (the `device` tool's `run`, from the repository root):
#   run(command="bash benchmarks/device_check.sh", timeout_s=600)
# A session gets 15 device minutes, start-up included, so this ends within ~9.5 minutes. It uses the
# machine's own python3 (torch 2.11, triton 3.6, and jinja2, sympy, networkx, hypothesis, pytest-xdist,
# pytest-timeout, matplotlib are installed there; nothing can be fetched).
#
#   1. (~4 min, all 16 cores) the CUDA tests: compiled kernels against the float64 reference in the three
#      dtypes, and the row buffers and caches of more than 2**31 elements. Beside them, warm-up runs of
#      the benchmarks (one repeat each) fill Triton's and Inductor's on-disk caches, so that the timed
#      runs spend their minutes timing, not compiling; and plain and causal attention are autotuned
#      over SHORTLIST (the choices are stored in ATTNGEN_CACHE_DIR).
#   2. (~5 min, alone on the GPU) the timed benchmarks: the variants of MAIN_ONLY (default: every variant
#      and the decoding sweep) at L=4096, D=64 and 128, bf16, untuned, within MAIN_BUDGET seconds (default
#      160); plain and causal tuned; with
#      LENGTH_SWEEP=1 also plain and causal over L=512..16384. A run cut by its timeout writes no
#      tables, but benchmarks.log holds every row measured (one JSON line each).
# $OUT brings back at most 8 files: the logs, and results.tgz with the result folders (tables, JSON, PNGs).
# TESTS_BUDGET (default 250) bounds step 1 in seconds; TUNED=0 skips the tuned timings of step 2; DIMS (default
# "64 128") sets the main sweep's head dims, D or DQK/DV (e.g. DIMS=192/128, MLA's training form).
# SMOKE=1 runs the same steps on tiny shapes, on any machine (a dry run of this script's plumbing).
set -u
OUT=${OUT:-/tmp/attngen-device}
WORK=/tmp/attngen-work
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=$PWD ATTNGEN_CACHE_DIR=$WORK/cache ATTNGEN_AUTOTUNE=0 ATTNGEN_QUIET=1 TRITON_DEFAULT_FP_FUSION=1 \
  PYTHONUNBUFFERED=1
SIZES="--lengths 4096 --dims ${DIMS:-64 128} --dtypes bfloat16 ${SMOKE:+--smoke}"
MAIN_ONLY=${MAIN_ONLY:-}
SWEEP="--only plain causal --lengths 16384 1024 8192 512 2048 --dims 64 128 --dtypes bfloat16 ${SMOKE:+--smoke}"
TESTS_BUDGET=${TESTS_BUDGET:-250}
SHORTLIST=$(python3 -c "import json; print(json.dumps([{'BLOCK_M': m, 'BLOCK_N': n, 'num_warps': w, 'num_stages': s}
  for m, n in ((64, 32), (64, 64), (128, 64), (128, 128)) for w in (4, 8) for s in (2, 3)]))")

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  python3 -c "import torch, triton, attngen; print('torch', torch.__version__, 'triton', triton.__version__,
              'cuda', torch.cuda.is_available())"
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"
[ -n "${SMOKE:-}" ] || grep -q "cuda True" "$OUT/environment.txt" || { echo "no usable CUDA or attngen import failed: stopping"; exit 1; }

# 1. correctness, with the benchmarks' compiles and the tuning beside it
{
  timeout $TESTS_BUDGET python3 -m pytest -v -m gpu -n 8 --timeout 200 -p no:cacheprovider tests/test_gpu.py \
    -k "not offsets and not scratch"
  echo "exit $? (124: cut at $TESTS_BUDGET s)"
} > "$OUT/gpu_tests.log" 2>&1 &
{
  timeout $TESTS_BUDGET python3 -m pytest -v -m gpu --timeout 120 -p no:cacheprovider tests/test_gpu.py \
    -k "offsets or scratch"
  echo "exit $? (124: cut at $TESTS_BUDGET s)"
} > "$WORK/offsets.log" 2>&1 &
warm() {  # warm NAME ARGS...: one untimed pass (log in $WORK/warm-NAME.log)
  local name=$1; shift
  timeout 250 python3 benchmarks/run.py --repeats 1 --out "$WORK/warm" "$@" > "$WORK/warm-$name.log" 2>&1
}
if [ -n "$MAIN_ONLY" ]; then
  warm main --only $MAIN_ONLY $SIZES &
else
  warm masks --only plain causal sliding_window $SIZES &
  warm mods --only alibi softcap t5_bias document prefix_lm block_sparse $SIZES &
  warm norms --only sigmoid softmax_sink off_by_one relu2 scalable_softmax affine_softmax elementwise_sigmoid2 \
    softpick signed_softmax polynomial $SIZES &
  warm others --only entropy_stat sparsemax entmax15 entmax_per_head stick_breaking differential linear_elu \
    retention decode $SIZES &
fi
TUNED=${TUNED:-1}
for variant in plain causal; do
  for dim in 64 128; do
    [ "$TUNED" = 1 ] && warm "tune-$variant-$dim" --only $variant $SIZES --dims $dim --candidates "$SHORTLIST" &
  done
done
[ "${LENGTH_SWEEP:-0}" = 1 ] && warm lengths $SWEEP &
wait
cat "$WORK/offsets.log" >> "$OUT/gpu_tests.log"
tail -n 3 "$WORK"/warm-*.log > "$OUT/warm.log" 2>&1
echo "== tests"; grep -E "passed|failed|error|^exit" "$OUT/gpu_tests.log" | grep -v PASSED | tail -n 12

# 2. timing, alone on the GPU
MAIN_BUDGET=${MAIN_BUDGET:-160}  # seconds; less where MAIN_ONLY leaves less to time
timeout $((MAIN_BUDGET + 40)) python3 benchmarks/run.py --repeats 20 --budget "$MAIN_BUDGET" --out "$WORK/results/main" \
  $SIZES \
  ${MAIN_ONLY:+--only $MAIN_ONLY} > "$OUT/benchmarks.log" 2>&1
echo "main sweep: exit $?" | tee -a "$OUT/benchmarks.log"
if [ "$TUNED" = 1 ]; then
  timeout 90 python3 benchmarks/run.py --repeats 20 --budget 60 --out "$WORK/results/tuned" --only plain causal \
    $SIZES --candidates "$SHORTLIST" >> "$OUT/benchmarks.log" 2>&1
  echo "tuned plain and causal: exit $?" | tee -a "$OUT/benchmarks.log"
fi
if [ "${LENGTH_SWEEP:-0}" = 1 ]; then
  timeout 100 python3 benchmarks/run.py --repeats 20 --budget 75 --out "$WORK/results/lengths" $SWEEP \
    >> "$OUT/benchmarks.log" 2>&1
  echo "length sweep: exit $?" | tee -a "$OUT/benchmarks.log"
fi

tar -czf "$OUT/results.tgz" -C "$WORK/results" . 2>/dev/null
for table in "$WORK"/results/*/*/results.md; do
  echo "== $table"; sed -n '/^## Targets/,/^## Decoding/p' "$table"
done
