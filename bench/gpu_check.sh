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
echo "build: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.txt"
rm -f "$OUT/build.log"  # kept only when the build fails: $OUT brings back at most 8 files

PART="${GPU_CHECK_PART:-all}"
tests_rc=0
if [ "$PART" != bench ]; then
t0=$(date +%s)
python3 -m pytest -q -x tests -p no:cacheprovider > "$OUT/tests.log" 2>&1  # $OUT keeps 8 files
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
} > "$OUT/sanitizer.txt" 2>&1
cat "$OUT/sanitizer.txt"; cat "$OUT/sanitizer.txt" >> "$OUT/tests.log"; rm -f "$OUT/sanitizer.txt"
echo "sanitizer: $(( $(date +%s) - t0 )) s"

fi

if [ "$PART" != tests ]; then
python3 bench/host_overhead.py --profile --json "$OUT/host_overhead.json" > "$OUT/host.txt" 2>&1
grep -E "fwd\+bwd|no_grad|gemm|mm \(" "$OUT/host.txt" | head -12
# the adapter GEMMs' tuning (lt_gemm.cpp) logged, then the same profile with the heuristic's
# first choice (POLYKERN_GEMM_TUNE=0) for comparison, into one file
POLYKERN_GEMM_TUNE_LOG=1 python3 bench/profile_step.py > "$OUT/profile.txt" 2>&1
# ... then the same profile with one version-7/8 feature off at a time (the side stream, the kept
# merged weight, the fused gY pass), and the fused pass alone against the two GEMMs it replaces
{ echo; echo "######## POLYKERN_OVERLAP=0 (no side stream)"
  POLYKERN_OVERLAP=0 python3 bench/profile_step.py
  echo; echo "######## --keep never (the backward merges again)"
  python3 bench/profile_step.py --keep never
  echo; echo "######## POLYKERN_FUSED_GY=0 (gU and gB_gen as two cuBLASLt GEMMs, version 6)"
  POLYKERN_FUSED_GY=0 python3 bench/profile_step.py
  echo; echo "######## bench/gy_pass_bench.py"; python3 bench/gy_pass_bench.py
} >> "$OUT/profile.txt" 2>&1
grep -E "total GPU time|wall time|^==|^####|tune" "$OUT/profile.txt" | head -60
sed -n '/gy_pass_bench/,$p' "$OUT/profile.txt"

# the experimental GEMM of version 12 (csrc/experimental, not part of the package): built on its
# own, checked against torch.mm, timed, then memcheck on its small shapes (one file: this part
# leaves 8 in $OUT, the most that come back; redirect the script's own output elsewhere)
if [ "${GPU_CHECK_WGMMA:-1}" = 1 ]; then  # GPU_CHECK_WGMMA=0 leaves it out
{ timeout 300 python3 -X faulthandler bench/wgmma_gemm_check.py; echo "rc=$?"
  echo "== compute-sanitizer memcheck (--small)"
  timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 \
    python3 bench/wgmma_gemm_check.py --small 2>&1 | grep -v "^========= *$" | tail -12
  echo "rc=${PIPESTATUS[0]}"; } > "$OUT/wgmma_gemm.txt" 2>&1
cat "$OUT/wgmma_gemm.txt"
fi

quick=""; [ "${GPU_CHECK_QUICK:-0}" = 1 ] && quick="--quick"
python3 bench/bench_layers.py $quick --json "$OUT/h100.json" --plot "$OUT/ratio_vs_N.png" \
  > "$OUT/bench.txt" 2>&1
echo "bench rc=$?"
sed -n '/all rows:/,$p' "$OUT/bench.txt" | grep -v -E "sweep|peak" | head -60
fi
exit $tests_rc
