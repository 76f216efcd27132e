"""Build the experimental wgmma GEMM (csrc/experimental/wgmma_gemm.cu, not part of the package)
with torch.utils.cpp_extension.load, check it against torch.mm and time it against torch.mm
(cuBLAS) on the base GEMM shapes of the benchmark. Plan for version 12, item 1: a base GEMM of our
own at cuBLAS's speed, into which the adapter's passes can then be fused.

    python bench/wgmma_gemm_check.py [--json out.json]

Also the fused form (C, U) = (A B^T, A Aadp^T) with Aadp (32, K): the adapter's down-projection
as one more column of tiles (not yet run on a GPU when written).

Correctness: fresh random bf16 operands (never zeros), the output poisoned with NaN first (every
element must be written), error against float64 at most 2x torch.mm's own error against float64
(both accumulate in fp32 and round once to bf16). Timing: CUDA events around 10 calls queued back to
back behind a GPU sleep (profile_step.wall_us), median of 15 such samples after 5 warm-up calls,
ours timed before and after torch.mm in the same process (the better of the two kept). The
committed run 2 (h100_wgmma_gemm.txt) timed the same batches without the leading sleep."""
import argparse
import glob
import json
import os

import torch
from torch.utils.cpp_extension import load

from profile_step import wall_us  # bench/ is this script's directory

HERE = os.path.dirname(os.path.abspath(__file__))


def build():
    src = os.path.join(HERE, "..", "csrc", "experimental", "wgmma_gemm.cu")
    # the cuBLAS/cuSPARSE headers ATen includes, from torch's wheel (as setup.py does)
    nvidia = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
    load(name="polykern_wgmma_gemm", sources=[src], verbose=False, is_python_module=False,
                extra_include_paths=sorted(glob.glob(os.path.join(nvidia, "cu*", "include"))),
                extra_cuda_cflags=["-O3", "-gencode", "arch=compute_90a,code=sm_90a",
                                   "--expt-relaxed-constexpr"],
                extra_ldflags=[])
    return torch.ops.polykern_exp


def time_us(fn, reps=15, batch=10, warmup=5):
    """GPU time per call: profile_step.wall_us (`batch` calls queued back to back behind a GPU
    sleep, between two events; median over reps), after warm-up."""
    for _ in range(warmup):
        fn()
    return wall_us(fn, steps=batch, reps=reps)


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--small", action="store_true",
                    help="the small shapes only, no timing (for compute-sanitizer)")
    args = ap.parse_args()
    ext = build()
    dev = "cuda"
    rows = []
    # correctness first, on small and odd-but-legal shapes, then the benchmark's shapes
    shapes = [(128, 256, 64), (256, 512, 192), (384, 768, 640), (1024, 1024, 4096),
              (8192, 4096, 4096), (8192, 14336, 4096), (8192, 4096, 14336)]
    if args.small:
        shapes = shapes[:3]
    g = torch.Generator(dev).manual_seed(0)
    for M, N, K in shapes:
        A = torch.randn(M, K, device=dev, dtype=torch.bfloat16, generator=g)
        B = torch.randn(N, K, device=dev, dtype=torch.bfloat16, generator=g)
        ref = A.double() @ B.double().t()
        C = ext.gemm_nt(A, B)
        torch.cuda.synchronize()
        written = bool(torch.isfinite(C).all())
        e_fast, e_mm = rel_err(C, ref), rel_err(A @ B.t(), ref)
        ok = written and e_fast <= 2 * e_mm
        row = {"op": "gemm_nt", "M": M, "N": N, "K": K, "all_written": written, "err": e_fast,
               "err_mm": e_mm, "ok": ok}
        if M * N * K >= 2 ** 30:
            t_ours = time_us(lambda: ext.gemm_nt(A, B))
            t_mm = time_us(lambda: A @ B.t())
            t_ours2 = time_us(lambda: ext.gemm_nt(A, B))
            row.update(us=min(t_ours, t_ours2), us_mm=t_mm,
                       tflops=2 * M * N * K / min(t_ours, t_ours2) / 1e6,
                       tflops_mm=2 * M * N * K / t_mm / 1e6)
            row["ratio_to_mm"] = row["us"] / t_mm
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in row.items()), flush=True)
    # the fused U column (kR = 32): (C, U) = (A B^T, A Aadp^T), against torch.mm for both, and
    # timed against the two cuBLAS calls it replaces and against the GEMM alone
    for M, N, K in shapes:
        A = torch.randn(M, K, device=dev, dtype=torch.bfloat16, generator=g)
        B = torch.randn(N, K, device=dev, dtype=torch.bfloat16, generator=g)
        Ad = torch.randn(32, K, device=dev, dtype=torch.bfloat16, generator=g)
        C, U = ext.gemm_nt_u(A, B, Ad)
        torch.cuda.synchronize()
        written = bool(torch.isfinite(C).all() and torch.isfinite(U).all())
        refC, refU = A.double() @ B.double().t(), A.double() @ Ad.double().t()
        eC, eU = rel_err(C, refC), rel_err(U, refU)
        eC_mm, eU_mm = rel_err(A @ B.t(), refC), rel_err(A @ Ad.t(), refU)
        ok = written and eC <= 2 * eC_mm and eU <= 2 * eU_mm
        row = {"op": "gemm_nt_u", "M": M, "N": N, "K": K, "all_written": written,
               "err": eC, "err_mm": eC_mm, "err_u": eU, "err_u_mm": eU_mm, "ok": ok}
        if M * N * K >= 2 ** 30:
            t_u = time_us(lambda: ext.gemm_nt_u(A, B, Ad))
            t_two = time_us(lambda: (A @ B.t(), A @ Ad.t()))
            t_alone = time_us(lambda: ext.gemm_nt(A, B))
            row.update(us=t_u, us_two_mm=t_two, us_gemm_alone=t_alone,
                       ratio_to_two_mm=t_u / t_two, u_cost_us=t_u - t_alone)
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in row.items()), flush=True)
    # bad input gets a clear error
    try:
        ext.gemm_nt(torch.randn(100, 64, device=dev, dtype=torch.bfloat16),
                    torch.randn(256, 64, device=dev, dtype=torch.bfloat16))
        print("bad shape: no error (WRONG)", flush=True)
    except RuntimeError as exc:
        print("bad shape:", str(exc).splitlines()[0], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "rows": rows}, f, indent=1)
    print("ALL OK" if all(r["ok"] for r in rows) else "SOME FAILED", flush=True)


if __name__ == "__main__":
    main()
