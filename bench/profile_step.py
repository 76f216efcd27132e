"""Per-kernel GPU time of one adapted layer's training step (torch.profiler), to see where the
adapter's time goes: python bench/profile_step.py [--N 8192] [--dim 4096]."""
import argparse

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

import polykern


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=4096)
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    for name, cls, cfg in (("PERA full r=16", polykern.PeraLinear, {"r": 16}),
                           ("GenLoRA r=16 K=32", polykern.GenLoraLinear, {"r": 16})):
        base = nn.Linear(args.dim, args.dim, bias=False, device=dev, dtype=dt)
        layer = cls.from_linear(base, **cfg)
        with torch.no_grad():
            for p in layer.adapter_parameters():
                p.add_(torch.randn_like(p) * 0.02)
        x = torch.randn(args.N, args.dim, device=dev, dtype=dt, requires_grad=True)
        gy = torch.randn(args.N, args.dim, device=dev, dtype=dt)
        for _ in range(5):
            layer(x).backward(gy)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                layer(x).backward(gy)
            torch.cuda.synchronize()
        print(f"== {name}, N={args.N}, {args.dim}x{args.dim} bf16, 10 steps")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14,
                                        max_name_column_width=60))


if __name__ == "__main__":
    main()
