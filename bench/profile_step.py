"""Per-kernel GPU time of one adapted layer's training step (torch.profiler), to see where the
adapter's time goes, and the step's wall time on the GPU (10 steps queued back to back, so that
kernels that overlap on two streams count once): python bench/profile_step.py [--N 8192]
[--dim 4096] [--out DIM] (out_features, default --dim) [--terms full|square|cross] (PERA's
expansion terms)."""
import argparse

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

import polykern
from timing import require_gpu  # bench/ is this script's directory


def layer_steps(N: int, dim: int, terms: str = "full", out: int = 0):
    """(name, step) for the frozen layer, PERA full r=16 and GenLoRA r=16 K=32 on an (out, dim)
    bf16 weight (out = dim unless given): ``step()`` is one forward+backward on a random (N, dim)
    input, each already run 5 times (warm-up, GEMM algorithm choice)."""
    dev, dt = "cuda", torch.bfloat16
    out = out or dim
    for name, cls, cfg in (("frozen nn.Linear", None, {}),
                           (f"PERA {terms} r=16", polykern.PeraLinear, {"r": 16, "terms": terms}),
                           ("GenLoRA r=16 K=32", polykern.GenLoraLinear, {"r": 16})):
        base = nn.Linear(dim, out, bias=False, device=dev, dtype=dt)
        base.requires_grad_(False)
        layer = base if cls is None else cls.from_linear(base, **cfg)
        adapter = [] if cls is None else layer.adapter_parameters()
        with torch.no_grad():
            for p in adapter:
                p.add_(torch.randn_like(p) * 0.02)
        x = torch.randn(N, dim, device=dev, dtype=dt, requires_grad=True)
        gy = torch.randn(N, out, device=dev, dtype=dt)
        params = [x] + adapter

        def step(layer=layer, x=x, gy=gy, params=params):
            for t in params:  # as bench_layers.py does: no gradient-accumulation kernels
                t.grad = None
            layer(x).backward(gy)
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        yield name, step


def size_args(doc: str):
    """--N, --dim, --out and --terms: the command line."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--N", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--out", type=int, default=0, help="out_features (default: --dim)")
    ap.add_argument("--terms", default="full", choices=["full", "square", "cross"],
                    help="PERA's expansion terms")
    return ap.parse_args()


def wall_us(step, steps=10, reps=5):
    """GPU wall time per step: steps queued back to back behind a GPU sleep (the host's launch
    latency hidden), between two events; median over reps."""
    out = []
    for _ in range(reps):
        torch.cuda._sleep(20_000_000)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(steps):
            step()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e) * 1e3 / steps)
    return sorted(out)[len(out) // 2]


def main():
    args = size_args(__doc__)
    require_gpu("profile_step.py")
    for name, step in layer_steps(args.N, args.dim, args.terms, args.out):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        print(f"== {name}, N={args.N}, {args.dim}x{args.out or args.dim} bf16: GPU kernels, per step")
        cuda = torch.autograd.DeviceType.CUDA
        # kernels and memsets; not the polykern::* host scopes (csrc/common.h), which the
        # profiler also shows as GPU ranges spanning the kernels launched inside them
        kernels = [e for e in prof.key_averages() if getattr(e, "device_type", None) == cuda
                   and not e.key.startswith("polykern::")]
        total = 0.0
        for e in sorted(kernels, key=lambda e: -e.device_time_total):
            us = e.device_time_total / 10
            total += us
            print(f"  {us:8.1f} us  {e.count / 10:4.1f} launch(es)  {e.key[:100]}")
        print(f"  {total:8.1f} us  total GPU time per step")
        print(f"  {wall_us(step):8.1f} us  GPU wall time per step (10 back to back)")
        if not kernels:  # an older profiler without device_type on the averages
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))


if __name__ == "__main__":
    main()
