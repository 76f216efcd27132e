"""The fused gY pass (csrc/gy_pass.cu) against the two cuBLASLt GEMMs it replaces (gU = gY B,
gB = gY^T U through the adapter core's GEMM helper), GPU time per call: 20 calls back to back,
CUDA events, median of 15 runs, so that the host's launch rate does not enter. bf16, N = 8192,
m = 4096 unless given. The floor is one read of gY plus the fp32 partials written and read once.

    python bench/gy_pass_bench.py [--N 8192] [--m 4096] [--R 8 16]   (the R the kernel takes)
"""
from __future__ import annotations

import argparse
import statistics

import torch

import polykern
from bench_layers import _timed  # bench/ is this script's directory

P = torch.ops.polykern
BW = 3.0e12  # bytes/s, the H100's HBM3 as used for the floors in csrc/README.md


def gpu_us(fn, batch=20, reps=15):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    return statistics.median(_timed(fn, batch) for _ in range(reps)) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=8192)
    ap.add_argument("--m", type=int, default=4096)
    ap.add_argument("--R", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--profile", action="store_true",
                    help="also the fused pass's two kernels' times (torch.profiler)")
    args = ap.parse_args()
    assert polykern.cuda_available(), "needs a GPU and the compiled extension"
    N, m, dt = args.N, args.m, torch.bfloat16
    print(f"fused gY pass vs two GEMMs, N={N}, m={m}, bf16, GPU us per call")
    print(f"{'R':>3} {'fused':>8} {'2 GEMMs':>8} {'ratio':>6} {'floor':>6} {'fused/floor':>11}")
    for R in args.R:
        gy = torch.randn(N, m, device="cuda", dtype=dt)
        B = torch.randn(m, R, device="cuda", dtype=dt)
        U = torch.randn(N, R, device="cuda", dtype=dt)
        assert P._gy_pass_takes(gy, B, U)
        fused = gpu_us(lambda: P._gy_pass(gy, B, U))
        gyt = gy.t()
        two = gpu_us(lambda: (P._adapter_gemm(gy, B), P._adapter_gemm(gyt, U)))
        cb = -(-m // (8 * 64))  # column blocks of NC = 8 tiles
        want = max(1, -(-2 * torch.cuda.get_device_properties(0).multi_processor_count // cb))
        chunk = max(128, -(-(-(-N // want)) // 64) * 64)
        rbn = -(-N // chunk)
        part = 4 * R * (cb * N + rbn * m)  # fp32 partials, written once and read once
        floor = (2 * N * m + 2 * part + 2 * R * (N + m)) / BW * 1e6
        print(f"{R:>3} {fused:8.1f} {two:8.1f} {two / fused:6.2f} {floor:6.1f} "
              f"{fused / floor:11.2f}")
        if args.profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    P._gy_pass(gy, B, U)
                torch.cuda.synchronize()
            for ev in prof.key_averages():
                if ev.device_time_total > 0 and not ev.key.startswith("polykern::"):
                    print(f"      {ev.key[:60]:60s} {ev.device_time_total / ev.count:8.1f} us")


if __name__ == "__main__":
    main()
