#!/usr/bin/env bash
# Issue 7 in one call on a 2-GPU machine (nvidia-h200-x2): build; the single-GPU reference and
# the same with the batch in two accumulated halves; DDP and FSDP2 on 2 GPUs with NCCL; the
# report (losses against the single run, adapters reloaded on one GPU, tokens/s per GPU) as
# $OUT/$NAME.json (default h200x2.json); the distributed tests (the NCCL one uses both GPUs).
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import sys, torch; sys.exit(torch.cuda.device_count() < 2)" 2>/dev/null; then
  echo "h200x2_run.sh: needs a machine with 2 CUDA GPUs and the CUDA build of torch" >&2; exit 2
fi
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-32}"
export PYTHONUNBUFFERED=1 CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
# NVLink multicast stays off (the device README: it can take the host's GPUs out of service)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'gpus', torch.cuda.device_count())"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
t0=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -e . > /tmp/build.log 2>&1; then
  tail -30 /tmp/build.log; echo "BUILD FAILED"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"
# GLOBAL_BATCH=512 STEPS=40 WARMUP=10 NAME=h200x2_batch512 SKIP_TESTS=1: the same model with a
# per-GPU batch large enough for the GPUs, not the host, to be the limit
NAME="${NAME:-h200x2}"
BIG="--dtype bfloat16 --hidden 1024 --layers 4 --heads 16 --inter 4096 --seq 128 --vocab 1000
     --pera-r 16 --genlora-r 16 --num-rbf 32 --global-batch ${GLOBAL_BATCH:-64}
     --steps ${STEPS:-300} --lr 1e-4 --timing-warmup ${WARMUP:-20}"
D=/tmp/polykern_dist
rm -rf "$D"
{
  echo "== config: $(echo $BIG)"
  python3 scripts/train_distributed.py --device cuda --modes single,single_accum $BIG --out "$D"
  python3 -m torch.distributed.run --standalone --nproc-per-node 2 scripts/train_distributed.py \
    --device cuda --modes ddp,fsdp2 $BIG --out "$D"
  echo "== report"
  python3 scripts/train_distributed.py --report --device cuda $BIG --out "$D" \
    --json "$OUT/$NAME.json"
  if [ "${SKIP_TESTS:-0}" != 1 ]; then
    echo "== tests/test_distributed.py"
    python3 -m pytest -q tests/test_distributed.py -p no:cacheprovider 2>&1 | tail -4
  fi
} 2>&1 | grep -v -i "warn" | tee "$OUT/${NAME}_run.log"
