"""Probe: can the adapter's memory-bound skinny GEMMs run concurrently with the compute-bound base
GEMM (two streams), and does leaving SMs to them (cuBLAS SM carveout) pay?

Times, bf16, N = 8192, n = m = 4096 (medians of CUDA-event timings after warm-up):
  base          y = x W^T alone
  skinny        U = x A^T (R = 16 and 152) and gA = gU^T x alone
  serial        base then skinny on one stream
  overlap       base on the current stream, skinny on a side stream, joined
and the same with torch._C._set_sm_carveout_experimental(k) for a few k.

    python3 bench/overlap_probe.py
"""
import statistics

import torch


def timed(fn, reps=15, inner=20, warm=5):
    """us per call: calls queued back to back (inner of them between two events), so that the
    host's launch latency is hidden; median over reps."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    out = []
    main = torch.cuda.current_stream()
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(5_000_000)  # let the host queue all calls before the GPU starts
        s.record(main)
        for _ in range(inner):
            fn()
        e.record(main)
        e.synchronize()
        out.append(s.elapsed_time(e) * 1e3 / inner)
    return statistics.median(out)


def main():
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    N, n, m = 8192, 4096, 4096
    x = torch.randn(N, n, device=dev, dtype=dt)
    W = torch.randn(m, n, device=dev, dtype=dt) / 64
    side = torch.cuda.Stream()
    main_s = torch.cuda.current_stream()
    print(torch.cuda.get_device_name(), torch.__version__,
          "SMs", torch.cuda.get_device_properties(0).multi_processor_count)
    for R in (16, 152):
        A = torch.randn(R, n, device=dev, dtype=dt) / 64
        gU = torch.randn(N, R, device=dev, dtype=dt)
        skinny = {"U = x A^T": lambda: x @ A.t(), "gA = gU^T x": lambda: gU.t() @ x}
        for name, sk in skinny.items():
            for k in (0, 4, 8, 16, 32):
                torch._C._set_sm_carveout_experimental(k if k else None)
                base = lambda: x @ W.t()
                t_base = timed(base)
                t_sk = timed(sk)

                def serial():
                    base()
                    sk()

                def overlap_side_first():
                    side.wait_stream(main_s)
                    with torch.cuda.stream(side):
                        sk()
                    base()
                    main_s.wait_stream(side)

                def overlap_base_first():
                    side.wait_stream(main_s)
                    base()
                    with torch.cuda.stream(side):
                        sk()
                    main_s.wait_stream(side)

                t_ser = timed(serial)
                t_o1 = timed(overlap_side_first)
                t_o2 = timed(overlap_base_first)
                print(f"R={R:3d} {name:12s} carveout={k:2d}: base {t_base:6.1f}  skinny "
                      f"{t_sk:5.1f}  serial {t_ser:6.1f}  overlap side-first {t_o1:6.1f} "
                      f"(saves {t_ser - t_o1:5.1f})  base-first {t_o2:6.1f} "
                      f"(saves {t_ser - t_o2:5.1f}) us")
    torch._C._set_sm_carveout_experimental(None)


if __name__ == "__main__":
    main()
