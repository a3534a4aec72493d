#!/usr/bin/env bash
# The prepared script for a lent GPU (the `device` tool's `run`, from the repository root):
#   run(command="bash benchmarks/device_check.sh", timeout_s=480)
# A session gets 15 device minutes, start-up included, so this stays under ~7 minutes and leaves
# time to rerun it once. It uses the machine's own python3 (torch 2.11, triton 3.6, and jinja2, sympy,
# networkx, hypothesis, pytest-xdist, matplotlib are installed there; nothing can be fetched).
# Everything it writes goes under $OUT (the device tool brings that folder back); the tables print last.
# Without autotuning (ATTNGEN_AUTOTUNE=0: the default launch configs) so that no minute goes to tuning;
# a tuned sweep (plain `python3 benchmarks/run.py`) needs a longer lease.
set -u
OUT=${OUT:-/tmp/attngen-device}
mkdir -p "$OUT"
export PYTHONPATH=$PWD ATTNGEN_CACHE_DIR=$OUT/cache ATTNGEN_AUTOTUNE=0 ATTNGEN_QUIET=1 TRITON_DEFAULT_FP_FUSION=1

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
              'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/environment.txt"

# 1. correctness on the GPU: the compiled kernels against the float64 reference (bf16 cases and the
#    normalization checks; all three dtypes would not fit the lease), 8 processes compiling in parallel;
#    then, alone (each takes up to ~35 GB), the caches and row buffers of more than 2**31 elements
timeout 150 python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider tests/test_gpu.py \
  -k "bfloat16 or normalizations or decoding" > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests: exit $? (124: cut at 150 s), last lines:" && tail -n 4 "$OUT/gpu_tests.log"
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py -k "offsets or scratch" \
  > "$OUT/gpu_offsets.log" 2>&1
echo "int64 offsets: exit $?, last lines:" && tail -n 4 "$OUT/gpu_offsets.log"

# 2. speed: the variants FlexAttention and SDPA share, two non-softmax ones, and decoding, at one length
timeout 200 python3 benchmarks/run.py --lengths 4096 --dims 64 128 --dtypes bfloat16 --repeats 10 \
  --budget 150 --out "$OUT/results" \
  --only plain causal sliding_window alibi softcap document prefix_lm sigmoid sparsemax decode \
  > "$OUT/benchmarks.log" 2>&1
echo "benchmarks: exit $? (124: cut at 200 s)"
cat "$OUT"/results/*/results.md 2>/dev/null || tail -n 20 "$OUT/benchmarks.log"
