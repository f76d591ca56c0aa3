#!/usr/bin/env bash
# Everything a GPU machine should check, in one go of under 8 minutes on one H200:
# install (building fastattn._C for sm_90a), the whole test suite on CUDA (the Triton, Gluon and CUDA C++
# kernels), the benchmarks of every op for our backends against torch and the peers, the end-to-end model speed
# (fastattn-bench e2e --quick), and one Markdown results table.
#   usage: benchmarks/device_check.sh OUT_DIR
# Each step has its own time limit so that a hang in one still leaves the others' results.
set -u
out=${1:?usage: benchmarks/device_check.sh OUT_DIR}
mkdir -p "$out"
tmp=$(mktemp -d)  # the device tool brings back at most 8 files: keep the small ones out of $out
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }

stamp "environment"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} > "$tmp/env.txt" 2>&1
cat "$tmp/env.txt"

stamp "install"
FASTATTN_CUDA_ARCHS=${FASTATTN_CUDA_ARCHS:-90a} $py -m pip install -q --no-deps --no-build-isolation --no-index -e . \
  > "$tmp/install.log" 2>&1 && echo "pip install -e . ok" || { echo "pip install failed:"; tail -n 30 "$tmp/install.log"; }
$py -m fastattn | tee -a "$tmp/env.txt"

stamp "tests on CUDA"
xdist=""
$py -c "import xdist" 2>/dev/null && xdist="-n ${TEST_WORKERS:-16}"  # compiling kernels is the long pole
FASTATTN_TEST_DEVICE=cuda FASTATTN_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-200} $py -m pytest -q $xdist -p no:cacheprovider tests \
  > "$out/tests.log" 2>&1
echo "tests exit code $?" >> "$out/tests.log"
tail -n 3 "$out/tests.log"

stamp "benchmarks"
# 16k tokens at width 2048, head dims 64/128/256: our Triton (every autotune candidate, the warp-specialized
# ones included) and Gluon kernels beside cuDNN, FA2 (sdpa-flash) and torch's default choice, in one run. One
# length keeps it inside 8 minutes: autotuning compiles every candidate of each new shape class.
impls=fastattn,fastattn-gluon,sdpa-cudnn,sdpa-flash,sdpa-default
timeout ${BENCH_TIMEOUT:-170} $py benchmarks/bench_attention.py \
  ${BENCH_ARGS:---head-dims 128,64,256 --seqlens 16384 --impls $impls} --out "$out" > "$out/bench.log" 2>&1
echo "bench exit code $?" >> "$out/bench.log"
# Issue 14's features beside the plain Triton case and cuDNN (head dim 128, 16k tokens): soft-capping and sinks
# should cost <= 5 %, document masking by block mask (50 % sparse) should be >= 1.8x the dense bool mask.
features=fastattn,fastattn-softcap,fastattn-sinks,fastattn-docmask,fastattn-docmask-dense,sdpa-cudnn
mkdir -p "$tmp/features"
timeout ${FEATURE_BENCH_TIMEOUT:-80} $py benchmarks/bench_attention.py --head-dims 128 --seqlens 16384 \
  --impls $features --out "$tmp/features" > "$tmp/bench_features.log" 2>&1
echo "feature bench exit code $?" >> "$tmp/bench_features.log"
{ echo; echo "## Features (issue 14)"; cat "$tmp/features/attention.md" 2>/dev/null || tail -n 20 "$tmp/bench_features.log"; } \
  >> "$out/bench.log"

stamp "norm benchmarks"
{
  timeout ${NORM_BENCH_TIMEOUT:-45} $py benchmarks/bench_norms.py --out "$tmp"
  echo "norm bench exit code $?"
  timeout ${POSENC_BENCH_TIMEOUT:-30} $py benchmarks/bench_posenc.py
  echo "posenc bench exit code $?"
  FASTATTN_AUTOTUNE=0 timeout ${DECODE_BENCH_TIMEOUT:-45} $py -m fastattn.bench.decode --quick
  echo "decode/varlen bench exit code $?"
} > "$out/bench_norms.log" 2>&1

stamp "end-to-end models"
# Autotuning off: the first config that fits, so that new shapes do not compile every candidate here.
FASTATTN_AUTOTUNE=0 timeout ${E2E_TIMEOUT:-90} $py -m fastattn.bench e2e --quick --no-compile --out "$tmp/e2e" \
  > "$out/e2e.log" 2>&1
echo "e2e exit code $?" >> "$out/e2e.log"

stamp "every tile config on the GPU"
# Each forced candidate config against float64 on the hardware (tests/test_attention_configs.py); last, with
# its own limit, because it compiles about a hundred kernels.
FASTATTN_TEST_DEVICE=cuda FASTATTN_TEST_CONFIGS=1 timeout ${CONFIG_TIMEOUT:-120} $py -m pytest -q $xdist \
  -p no:cacheprovider tests/test_attention_configs.py -k forced_gpu_config > "$tmp/configs.log" 2>&1
echo "config runs exit code $?" >> "$tmp/configs.log"
tail -n 3 "$tmp/configs.log"

stamp "results table"
{
  echo "# fastattn device check"
  echo
  echo '```'
  cat "$tmp/env.txt"
  echo '```'
  echo
  echo "## Tests on CUDA"
  echo
  echo '```'
  grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)|exit code" "$out/tests.log" | tail -n 25
  grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)|exit code" "$tmp/configs.log" | tail -n 10
  echo '```'
  echo
  echo "## Attention (TFLOP/s, median of do_bench)"
  echo
  cat "$out/attention.md" 2>/dev/null || tail -n 20 "$out/bench.log"
  echo
  echo "## Norms, positional encodings (GB/s of minimal bytes), decode (GB/s of cache read), varlen (TFLOP/s)"
  echo
  cat "$out/bench_norms.log"
  echo
  echo "## End-to-end models (fastattn-bench e2e --quick)"
  echo
  cat "$tmp/e2e/e2e.md" 2>/dev/null || tail -n 20 "$out/e2e.log"
} > "$out/results.md"
cat "$out/results.md"
stamp "done"
