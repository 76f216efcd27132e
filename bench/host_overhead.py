"""Host (CPU) time per call of each piece of an adapted layer's step, at a size where the GPU
work is negligible (N = 64), so that what is timed is the launch path: Python, the dispatcher,
autograd. Microseconds per call, median of 7 batches of 200 calls (the GPU is synchronised once
per batch).

    python bench/host_overhead.py [--N 64] [--dim 4096] [--big-N 8192] [--json out.json]
                                  [--profile]

--big-N also times the host side of whole steps at that size (3 steps per batch, so the host
never waits for the GPU): whether a step's host time exceeds its GPU time there, which is when
steps run back to back at the host's pace. --profile also prints torch.profiler's CPU table
(self time per op, and per polykern::* scope inside the ops: csrc/common.h POLYKERN_SCOPE) for a
few layer steps at N and at --big-N, to see which host calls a step's time goes to.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import polykern
from timing import require_gpu  # bench/ is this script's directory
from polykern import modules, ops
from polykern import reference as ref


def host_us(fn, calls=200, batches=7):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        per.append((t1 - t0) / calls * 1e6)
    return statistics.median(per)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=64)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--big-N", type=int, default=8192, help="0: skip")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    require_gpu("host_overhead.py")
    dev, dt, n = "cuda", torch.bfloat16, args.dim
    torch.manual_seed(0)
    base = nn.Linear(n, n, bias=False, device=dev, dtype=dt).requires_grad_(False)
    pera = polykern.PeraLinear.from_linear(base, r=16)
    gen = polykern.GenLoraLinear.from_linear(
        nn.Linear(n, n, bias=False, device=dev, dtype=dt), r=16, num_rbf=32)
    with torch.no_grad():
        for p in pera.adapter_parameters() + gen.adapter_parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x = torch.randn(args.N, n, device=dev, dtype=dt, requires_grad=True)
    gy = torch.randn(args.N, n, device=dev, dtype=dt)
    A, B, h = pera.adapter_parameters()
    pi, pj = ref.pera_pairs(16, "full", A.device)
    W = base.weight
    lA = (torch.randn(16, n, device=dev, dtype=dt) * 0.02).requires_grad_()
    lB = (torch.randn(n, 16, device=dev, dtype=dt) * 0.02).requires_grad_()
    out = ops.pera_linear(x, W, None, A, B, h, pera.scaling, "full")
    _, U = torch.ops.polykern.pera_linear(x, W, None, A, B, h, pi, pj, pera.scaling, None)

    trainable = [x, lA, lB] + pera.adapter_parameters() + gen.adapter_parameters()

    def step(f):
        def g():
            for t in trainable:  # as bench_layers.py does: no accumulation kernels
                t.grad = None
            f(x).backward(gy)
        return g

    def caller_thread(fn):  # the autograd engine runs the backward on the calling thread
        def g():
            with torch.autograd.set_multithreading_enabled(False):
                fn()
        return g

    lora = lambda t: F.linear(t, W) + F.linear(F.linear(t, lA), lB)  # noqa: E731
    outs = {"frozen": base(x), "lora": lora(x), "pera": pera(x), "genlora": gen(x)}
    grad_of = {"frozen": [x], "lora": [x, lA, lB], "pera": [x] + pera.adapter_parameters(),
               "genlora": [x] + gen.adapter_parameters()}

    def bwd_only(k):  # torch.autograd.grad of a kept output: the backward alone, no accumulation
        return lambda: torch.autograd.grad(outs[k], grad_of[k], gy, retain_graph=True)

    cases = {
        "frozen nn.Linear fwd+bwd": step(base),
        "plain LoRA eager fwd+bwd": step(lambda t: F.linear(t, W) + F.linear(F.linear(t, lA),
                                                                             lB)),
        "PeraLinear fwd+bwd": step(pera),
        "GenLoraLinear fwd+bwd": step(gen),
        "frozen fwd+bwd, engine on caller thread": caller_thread(step(base)),
        "plain LoRA fwd+bwd, engine on caller thread": caller_thread(step(lora)),
        "PeraLinear fwd+bwd, engine on caller thread": caller_thread(step(pera)),
        "GenLoraLinear fwd+bwd, engine on caller thread": caller_thread(step(gen)),
        "frozen bwd only (autograd.grad)": bwd_only("frozen"),
        "plain LoRA bwd only (autograd.grad)": bwd_only("lora"),
        "PeraLinear bwd only (autograd.grad)": bwd_only("pera"),
        "GenLoraLinear bwd only (autograd.grad)": bwd_only("genlora"),
        "frozen fwd (grad on)": lambda: base(x),
        "GenLoraLinear fwd (grad on)": lambda: gen(x),
        "PeraLinear fwd (grad on)": lambda: pera(x),
        "PeraLinear fwd (no_grad)": torch.no_grad()(lambda: pera(x)),
        "ops.pera_linear fwd (grad on)": lambda: ops.pera_linear(x, W, None, A, B, h,
                                                                 pera.scaling, "full"),
        "op pera_linear direct": lambda: torch.ops.polykern.pera_linear(
            x, W, None, A, B, h, pi, pj, pera.scaling, None),
        "op pera_linear_backward direct": lambda: torch.ops.polykern.pera_linear_backward(
            gy, x, None, W, A, B, h, pi, pj, pera.scaling, U, [True, False, True]),
        "op pera_expand direct": lambda: torch.ops.polykern.pera_expand(
            A, B, h, pi, pj, pera.scaling, dt),
        "torch.mm (64 x n x 16)": lambda: torch.mm(x.detach(), lA.detach().t()),
        "op _adapter_gemm (64 x n x 16)": lambda: torch.ops.polykern._adapter_gemm(
            x.detach(), lA.detach().t()),
        "python: _check_input": lambda: pera._check_input(x),
        "python: compute_inputs": lambda: modules.compute_inputs(x, W, None),
        "python: pera_pairs": lambda: ref.pera_pairs(16, "full", A.device),
        "python: ops.cuda_available": ops.cuda_available,
        "python: ops._eager": ops._eager,
        "backward of a cached out": lambda: out.backward(gy, retain_graph=True),
    }
    big = {}
    if args.big_N:
        xb = torch.randn(args.big_N, n, device=dev, dtype=dt, requires_grad=True)
        gyb = torch.randn(args.big_N, n, device=dev, dtype=dt)

        def big_step(f):
            def g():
                for t in trainable + [xb]:
                    t.grad = None
                f(xb).backward(gyb)
            return g
        big = {f"frozen nn.Linear fwd+bwd, N={args.big_N}": big_step(base),
               f"PeraLinear fwd+bwd, N={args.big_N}": big_step(pera),
               f"GenLoraLinear fwd+bwd, N={args.big_N}": big_step(gen)}
    res = {}
    for name, fn in big.items():  # host time only: 3 steps queue ahead of a busy GPU
        res[name] = host_us(fn, calls=3, batches=21)
        print(f"{name:42s} {res[name]:8.1f} us", flush=True)
    for name, fn in cases.items():
        res[name] = host_us(fn)
        x.grad = None
        for p in pera.adapter_parameters() + gen.adapter_parameters() + [lA, lB]:
            p.grad = None
        print(f"{name:42s} {res[name]:8.1f} us", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        todo = [(k, cases[k], 20) for k in ("frozen nn.Linear fwd+bwd", "PeraLinear fwd+bwd",
                                             "GenLoraLinear fwd+bwd")]
        todo += [(k, fn, 3) for k, fn in big.items()]
        for name, fn, steps in todo:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    fn()
                torch.cuda.synchronize()
            print(f"== host profile of {name}, {steps} steps (us are totals over the {steps})")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "N": args.N, "dim": n,
                       "big_N": args.big_N,
                       "host_us": res}, f, indent=1)


if __name__ == "__main__":
    main()
