"""Where a synchronised training step of one layer waits: torch.profiler's timeline of one step
(after warm-up), each GPU kernel with its start, its end and the idle time before it, and the
host calls that launched work, all in microseconds from the step's start. The idle time before
the first kernel is the host's latency; idle time between kernels means the host fell behind.

    python bench/timeline_step.py [--N 8192] [--dim 4096]
"""
import torch
from torch.profiler import ProfilerActivity, profile

from profile_step import layer_steps, size_args  # bench/ is this script's directory

HOST_CALLS = ("polykern::", "aten::mm", "aten::addmm", "autograd::engine::evaluate_function",
              "cudaLaunchKernel", "cuLaunchKernel", "cudaMemsetAsync")


def main():
    args = size_args(__doc__)
    for name, step in layer_steps(args.N, args.dim, args.terms, args.out):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        events = prof.events()
        cpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
        t0 = min(e.time_range.start for e in cpu)
        gpu = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                      and not e.name.startswith("polykern::")),  # host scopes' GPU ranges
                     key=lambda e: e.time_range.start)
        print(f"== {name}, N={args.N}: one synchronised step (us from its start)")
        rows = []
        for e in cpu:
            if e.name.startswith(HOST_CALLS):
                rows.append((e.time_range.start - t0, f"host {e.name[:60]}",
                             e.time_range.end - e.time_range.start))
        last_end, idle = None, 0.0
        for e in gpu:
            s, t = e.time_range.start - t0, e.time_range.end - t0
            gap = s if last_end is None else max(0.0, s - last_end)
            idle += gap
            rows.append((s, f"GPU  {e.name[:60]}  (idle before: {gap:.1f})", t - s))
            last_end = t if last_end is None else max(last_end, t)
        for when, what, dur in sorted(rows):
            print(f"  {when:9.1f}  {dur:8.1f}  {what}")
        busy = sum(e.time_range.end - e.time_range.start for e in gpu)
        print(f"  GPU busy {busy:.1f} us, idle {idle:.1f} us before its last kernel ended at "
              f"{(last_end or 0):.1f} us")


if __name__ == "__main__":
    main()
