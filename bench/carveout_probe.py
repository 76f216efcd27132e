"""Probe: does leaving a few SMs to the side stream shorten an adapted layer's step?

The base GEMM (nvjet 256x128 tiles, persistent, one 214 KiB CTA per SM) fills all 132 SMs of an
H100, so the adapter's memory-bound skinny GEMMs on the side stream only get SMs in its last,
partial wave. At N = 8192, n = m = 4096 it has 1024 tiles: 7.76 per SM on 132 SMs, exactly 8 on
128, so a GEMM told to use 128 SMs (cuBLAS's SM count target; torch's
`torch._C._set_sm_carveout_experimental`) should take as long, and leave 4 SMs free for its
whole length. This script measures, per carve-out: the frozen GEMM alone, the GEMM beside a
64 MiB copy on another stream, and the GPU wall time of the frozen, PERA full, PERA square and
GenLoRA training steps (10 back to back). python bench/carveout_probe.py [--N 8192]"""
import argparse

import torch

import polykern  # noqa: F401  (the ops)
from profile_step import layer_steps, wall_us


def gemm_beside_copy(N, dim, carve):
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(N, dim, device=dev, dtype=dt)
    w = torch.randn(dim, dim, device=dev, dtype=dt)
    src = torch.randn(N, dim, device=dev, dtype=dt)
    dst = torch.empty_like(src)
    side = torch.cuda.Stream()

    def gemm():
        return x @ w.t()

    def both():
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        y = gemm()
        with torch.cuda.stream(side):
            dst.copy_(src)
        main.wait_stream(side)
        return y
    res = {}
    for name, f in (("gemm", gemm), ("copy", lambda: dst.copy_(src)), ("gemm+copy", both)):
        for _ in range(3):
            f()
        res[name] = wall_us(f)
    print(f"carve-out {carve}: " + ", ".join(f"{k} {v:.1f} us" for k, v in res.items()),
          flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--carve", default="0,4,8,12")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__,
          "SMs", torch.cuda.get_device_properties(0).multi_processor_count)
    for backend in ("default", "cublaslt"):
        if backend == "cublaslt":
            torch.backends.cuda.preferred_blas_library("cublaslt")
        print(f"######## preferred BLAS: {torch.backends.cuda.preferred_blas_library()}")
        for c in [int(v) for v in args.carve.split(",")]:
            torch._C._set_sm_carveout_experimental(c if c > 0 else None)
            gemm_beside_copy(args.N, args.dim, c)
            for terms in ("full", "square"):
                for name, step in layer_steps(args.N, args.dim, terms):
                    if terms == "square" and not name.startswith("PERA"):
                        continue
                    print(f"  carve-out {c:2d}  {name:22s} {wall_us(step):8.1f} us", flush=True)
        torch._C._set_sm_carveout_experimental(None)


if __name__ == "__main__":
    main()
