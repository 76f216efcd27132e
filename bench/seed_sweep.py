"""Run tests/test_ops_cuda.py's kernel-vs-reference test over many random seeds, to measure how
often its derived tolerance (the kernel's error against float64 at most 2x the same-dtype
reference's) fails on fresh data, and by how much. The test suite draws one seed per case (from
Python's hash of the case, so it changes with PYTHONHASHSEED); this draws --seeds of them.

    python bench/seed_sweep.py [--seeds 20] [--kind genlora] [--dtype float16]
        [--adapter-dtype float32] [--layout 3d] [--budget-s 120]

Prints each failure (case, seed, the assertion's message) and a count per case."""
import argparse
import builtins
import collections
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import test_ops_cuda as T  # noqa: E402  (the tests' own helpers and cases)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--kind", choices=["pera", "genlora"], default=None)
    ap.add_argument("--dtype", choices=list(DTYPES), default=None)
    ap.add_argument("--adapter-dtype", choices=list(DTYPES), default=None)
    ap.add_argument("--layout", choices=["3d", "strided"], default=None)
    ap.add_argument("--budget-s", type=float, default=120.0, help="stop after this many seconds")
    args = ap.parse_args()
    cases = [(k, cfg, r, d, a, lay) for (k, cfg, r) in T.CASES for (d, a) in T.KERNEL_DTYPES
             for lay in T.LAYOUTS
             if (args.kind is None or k == args.kind)
             and (args.dtype is None or d == DTYPES[args.dtype])
             and (args.adapter_dtype is None or a == DTYPES[args.adapter_dtype])
             and (args.layout is None or lay == args.layout)]
    runs, fails = collections.Counter(), collections.Counter()
    t0 = time.time()
    for seed in range(args.seeds):
        # the test module seeds each case with hash(case): salt it with the sweep's seed
        T.hash = lambda t, s=seed: builtins.hash((t, "seed_sweep", s))
        for case in cases:
            key = f"{case[0]} {case[1]} r={case[2]} {case[3]}/{case[4]} {case[5]}"
            runs[key] += 1
            try:
                T.test_kernel_vs_reference(*case)
            except AssertionError as e:
                fails[key] += 1
                print(f"FAIL seed {seed}: {key}: {str(e).splitlines()[0]}", flush=True)
        if time.time() - t0 > args.budget_s:
            print(f"(stopped after seed {seed}: budget of {args.budget_s:.0f} s spent)")
            break
    print(f"{sum(runs.values())} runs of {len(cases)} cases, {sum(fails.values())} failures, "
          f"{time.time() - t0:.0f} s")
    for key, n in sorted(fails.items()):
        print(f"  {n}/{runs[key]} failed: {key}")


if __name__ == "__main__":
    main()
