#!/usr/bin/env bash
# One call on a GPU machine: build the extension, run the GPU test suite and compute-sanitizer,
# then the benchmarks. Results go under $OUT (at most 8 files come back from a device call).
#   bash bench/gpu_check.sh                      everything (longer than one 10-minute call)
#   GPU_CHECK_PART=tests bash bench/gpu_check.sh   build, tests, sanitizer, selftest
#   GPU_CHECK_PART=e2e bash bench/gpu_check.sh     build, the end-to-end benchmark
#   GPU_CHECK_PART=layers bash bench/gpu_check.sh  build, the per-layer benchmarks
#   GPU_CHECK_ARCH=8.0+PTX GPU_CHECK_PART=tests    the portable build (compute_80 PTX compiled by
#                                                  the driver at load): the
#                                                  closest check of the A100 path on an H100
#   E2E_ARGS="--impls ... --workloads ..."         passed to bench/bench_e2e.py
#   LAYERS_K="not sweep"                           a subset of the per-layer cases
# Exits non-zero when the build, the tests, the sanitizer or a benchmark fails.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi > /dev/null || ! nvidia-smi -L > /dev/null 2>&1; then
  echo "gpu_check.sh needs an NVIDIA GPU (nvidia-smi found none); run it on a GPU machine" >&2
  exit 2
fi
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${GPU_CHECK_ARCH:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONUNBUFFERED=1 CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
PART="${GPU_CHECK_PART:-all}"
rc=0
fail() { echo "FAILED: $1"; rc=1; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "arch list: $TORCH_CUDA_ARCH_LIST"; } > "$OUT/env.txt" 2>&1

t0=$(date +%s)
if [ -n "$(ls polykern/_C*.so 2>/dev/null)" ] && [ "${GPU_CHECK_REBUILD:-1}" = 0 ]; then
  echo "build: reusing the carried polykern/_C*.so" | tee -a "$OUT/env.txt"
elif ! python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
else
  echo "build: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.txt"
  rm -f "$OUT/build.log"
fi
python3 -c "import polykern, sys; sys.exit(0 if polykern.cuda_available() else 1)" \
  || { echo "polykern's CUDA ops are not usable here"; exit 1; }

if [ "$PART" = all ] || [ "$PART" = tests ]; then
  t0=$(date +%s)
  python3 -m pytest -q tests -p no:cacheprovider -x --maxfail=20 > "$OUT/tests.log" 2>&1 \
    || fail "tests"
  tail -3 "$OUT/tests.log"
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30
  echo "tests: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.txt"
  t0=$(date +%s)
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer --tool $tool" >> "$OUT/tests.log"
    compute-sanitizer --tool "$tool" --error-exitcode 9 python3 bench/sanitize_case.py 2>&1 \
      | grep -v "^========= *$" | tail -6 >> "$OUT/tests.log"
    s=${PIPESTATUS[0]}
    echo "sanitizer $tool rc=$s" | tee -a "$OUT/tests.log"
    [ "$s" -eq 0 ] || fail "compute-sanitizer $tool"
  done
  echo "sanitizer: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.txt"
  if python3 -c "import polykern.selftest" 2> /dev/null; then  # issue 26
    python3 -m polykern.selftest --quick --json "$OUT/selftest_h100.json" > "$OUT/selftest.txt" 2>&1 \
      || fail "selftest"
    tail -3 "$OUT/selftest.txt"
  fi
fi

if [ "$PART" = all ] || [ "$PART" = e2e ]; then
  # shellcheck disable=SC2086
  python3 bench/bench_e2e.py ${E2E_ARGS:-} --json "$OUT/e2e_h100.json" > "$OUT/e2e.txt" 2>&1 \
    || fail "bench_e2e.py"
  grep -v "^{" "$OUT/e2e.txt" | tail -90
fi

if [ "$PART" = all ] || [ "$PART" = layers ]; then
  # LAYERS_K: a pytest -k expression to run part of the cases (e.g. "not sweep")
  python3 -m pytest bench/ --benchmark-only -q -p no:cacheprovider ${LAYERS_K:+-k "$LAYERS_K"} \
    --benchmark-json "$OUT/layers_h100.json" > "$OUT/layers.txt" 2>&1 || fail "layer benchmarks"
  tail -5 "$OUT/layers.txt"
  python3 bench/report.py --layers "$OUT/layers_h100.json" 2>&1 | tail -20
fi
exit $rc
