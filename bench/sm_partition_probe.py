"""Probe for plan item 6 (csrc/README.md): can the adapter's skinny work run on 4 SMs beside a
base GEMM told to leave them free, for the GEMM's whole length?

The base GEMM at N = 8192, 4096 x 4096 (bf16) has 1024 tiles of 256 x 128: 7.76 waves on 132
SMs, 8 on 128, so a cuBLASLt GEMM with an SM carve-out of 4 should take about as long and leave
4 SMs free. The forward's U = x A^T (R = 32: one read of x, 64 MiB, 2.1 GFLOP) is run by the
experimental GEMM's U tiles alone (`gemm_nt_u` with an empty B, csrc/experimental/wgmma_gemm.cu)
on a grid of 4 CTAs: persistent, TMA-fed, wgmma. Measured (GPU time per call, 10 back to back,
profile_step.wall_us): the GEMM alone per carve-out, U alone on 4 CTAs and on the whole GPU,
cuBLAS's x @ A^T alone, and the GEMM with U on 4 CTAs on a second stream (U launched first).
If "GEMM + U(4)" equals the GEMM alone, U is hidden entirely.

    python bench/sm_partition_probe.py"""
import torch

from profile_step import wall_us  # bench/ is this script's directory
from wgmma_gemm_check import build


def main():
    ext = build()
    dev, dt = "cuda", torch.bfloat16
    N, n, m, R = 8192, 4096, 4096, 32
    g = torch.Generator(dev).manual_seed(0)
    x = torch.randn(N, n, device=dev, dtype=dt, generator=g)
    W = torch.randn(m, n, device=dev, dtype=dt, generator=g) / n ** 0.5
    A = torch.randn(R, n, device=dev, dtype=dt, generator=g) / n ** 0.5
    empty_b = torch.empty(0, n, device=dev, dtype=dt)
    print(torch.cuda.get_device_name(), torch.__version__,
          "SMs", torch.cuda.get_device_properties(0).multi_processor_count, flush=True)

    def u_only(grid):
        return ext.gemm_nt_u(A=x, B=empty_b, Aadp=A, grid_limit=grid, variant=1)[1]

    ref = (x.double() @ A.double().t())
    for grid in (4, 0):
        U = u_only(grid)
        torch.cuda.synchronize()
        err = ((U.double() - ref).norm() / ref.norm()).item()
        err_mm = (((x @ A.t()).double() - ref).norm() / ref.norm()).item()
        print(f"U alone, grid {grid or 'all'}: err {err:.3e} (torch.mm {err_mm:.3e}) "
              f"{'ok' if err <= 2 * err_mm else 'WRONG'}", flush=True)
    for f in (lambda: u_only(4), lambda: u_only(0), lambda: x @ A.t()):
        for _ in range(3):
            f()
    print(f"U alone on 4 CTAs {wall_us(lambda: u_only(4)):8.1f} us | on the whole GPU "
          f"{wall_us(lambda: u_only(0)):8.1f} us | cuBLAS x @ A^T {wall_us(lambda: x @ A.t()):8.1f}"
          " us", flush=True)
    side = torch.cuda.Stream()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    for carve in (0, 4):
        torch._C._set_sm_carveout_experimental(carve if carve > 0 else None)

        def gemm():
            return x @ W.t()

        def both():
            main = torch.cuda.current_stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                u = u_only(4)
            y = gemm()
            main.wait_stream(side)
            return y, u
        for f in (gemm, both):
            for _ in range(3):
                f()
        print(f"cuBLASLt carve-out {carve}: GEMM alone {wall_us(gemm):8.1f} us | GEMM + U on 4 "
              f"CTAs (second stream) {wall_us(both):8.1f} us", flush=True)
    torch._C._set_sm_carveout_experimental(None)


if __name__ == "__main__":
    main()
