#!/usr/bin/env bash
# One call on a GPU machine: build the extension, run the whole test suite (GPU tests included),
# compute-sanitizer on a small case, and the layer benchmarks. Results go under $OUT.
#   bash bench/gpu_check.sh            (OUT defaults to ./gpu_out)
#   GPU_CHECK_QUICK=1 bash bench/gpu_check.sh   (one benchmark case only)
#   GPU_CHECK_PART=tests|bench bash bench/gpu_check.sh   (build, then only that half: the whole
#   script takes longer than one 10-minute device call, so it is run as two calls)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONUNBUFFERED=1 CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/env.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__)" >> "$OUT/env.txt"

t0=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"

PART="${GPU_CHECK_PART:-all}"
tests_rc=0
if [ "$PART" != bench ]; then
t0=$(date +%s)
python3 -m pytest -q -x tests -p no:cacheprovider > "$OUT/tests.log" 2>&1
tests_rc=$?
tail -5 "$OUT/tests.log"
echo "tests: rc=$tests_rc, $(( $(date +%s) - t0 )) s"
[ $tests_rc -eq 0 ] || grep -E "^(FAILED|ERROR)|Error|assert" "$OUT/tests.log" | head -30

t0=$(date +%s)
{
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer --tool $tool"
    compute-sanitizer --tool "$tool" --error-exitcode 9 python3 bench/sanitize_case.py 2>&1 \
      | grep -v "^========= *$" | tail -8
    echo "rc=${PIPESTATUS[0]}"
  done
} > "$OUT/sanitizer.log" 2>&1
cat "$OUT/sanitizer.log"
echo "sanitizer: $(( $(date +%s) - t0 )) s"

fi

if [ "$PART" != tests ]; then
python3 bench/host_overhead.py --json "$OUT/host_overhead.json" > "$OUT/host_overhead.txt" 2>&1
grep -E "fwd\+bwd|no_grad" "$OUT/host_overhead.txt"
python3 bench/profile_step.py > "$OUT/profile.txt" 2>&1

quick=""; [ "${GPU_CHECK_QUICK:-0}" = 1 ] && quick="--quick"
python3 bench/bench_layers.py $quick --json "$OUT/h100.json" --plot "$OUT/ratio_vs_N.png" \
  > "$OUT/bench.txt" 2>&1
echo "bench rc=$?"
sed -n '/all rows:/,$p' "$OUT/bench.txt" | grep -v -E "sweep|peak" | head -60
fi
exit $tests_rc
