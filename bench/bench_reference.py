"""Benchmark: polykern's reference PERA layer against the authors' formulation.

Times forward + backward of, on the same shapes and data:

- ``linear``: a frozen ``nn.Linear`` (``F.linear`` with a weight that needs no gradient, an input
  that does), the floor every adapted layer is measured against;
- ``reference``: ``polykern.reference.pera_linear``, pair indices built once and cached on the
  device, the expansion done with two ``index_select`` gathers;
- ``authors``: ``polykern.reference.pera_linear_authors``, the authors' formulation, which builds
  an r x r outer product and a boolean triu gather (a host sync on CUDA) on every call.

Each row reports the median of many runs after warm-up; the three variants run interleaved, round
after round, so that drifts in the machine's speed hit all three alike. CPU runs fp32 and time with
``time.perf_counter``; CUDA runs bf16 by default and time each run with CUDA events. The ratio
columns divide by the frozen linear of the same row. ``--json PATH`` also writes the rows.

Usage::

    python bench/bench_reference.py                      # CPU fp32 (CUDA bf16 when available)
    python bench/bench_reference.py --device cpu --json bench/results/cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

try:
    from polykern import reference
except ImportError:  # run from a checkout without installing: python bench/bench_reference.py
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from polykern import reference

VARIANTS = ("linear", "reference", "authors")
NOISE = 1.03  # ratios within 3% are not told apart by a median of this many runs


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def header(device: torch.device, dtype: torch.dtype) -> List[str]:
    lines = ["# polykern bench_reference: PERA reference vs authors' formulation, fwd+bwd",
             f"# date {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
             f"# command: python {' '.join(sys.argv)}",
             f"# torch {torch.__version__}, python {platform.python_version()}, "
             f"device {device}, dtype {str(dtype).replace('torch.', '')}"]
    if device.type == "cuda":
        lines.append(f"# GPU {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}")
    lines.append(f"# CPU {cpu_model()}, {os.cpu_count()} cores, torch threads "
                 f"{torch.get_num_threads()}{load_average()}")
    return lines


def load_average() -> str:
    """``", load average 1/5/15 min a b c"`` where the OS reports it: other work on the machine
    (a concurrent process on a small machine) shows up in CPU timings, so the header records it."""
    try:
        return ", load average 1/5/15 min " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except (AttributeError, OSError):
        return ""


def make_case(N: int, n: int, m: int, r: int, terms: str, device, dtype) -> Dict[str, Callable]:
    """One closure per variant, each running forward + backward on the same tensors.

    Frozen ``W (m, n)`` and bias ``(m,)``; ``x (N, n)`` needs a gradient (as inside a network);
    adapter parameters ``A (r, n)``, ``B (m, r)``, ``h (P,)`` in fp32 (the usual mixed-precision
    set-up: the factors are cast to the compute dtype inside the layer); ``gy (N, m)``.
    """
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, dt=dtype, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dt)

    P = reference.pera_num_pairs(r, terms)
    W = randn(m, n, std=n ** -0.5)
    bias = randn(m, std=0.02)
    x = randn(N, n).requires_grad_(True)
    # Non-zero B and h (after training they are), so no path can skip work on zeros.
    A = randn(r, n, dt=torch.float32, std=n ** -0.5).requires_grad_(True)
    B = randn(m, r, dt=torch.float32, std=0.02).requires_grad_(True)
    h = randn(P, dt=torch.float32, std=0.1).requires_grad_(True)
    gy = randn(N, m)
    s = 2.0  # alpha / r, any value

    def clear():
        for t in (x, A, B, h):
            t.grad = None

    def run_linear():
        clear()
        F.linear(x, W, bias).backward(gy)

    def run_reference():
        clear()
        reference.pera_linear(x, W, bias, A, B, h, s, terms).backward(gy)

    def run_authors():
        clear()
        reference.pera_linear_authors(x, W, bias, A, B, h, s, terms).backward(gy)

    # The two formulations must agree, or the comparison means nothing.
    with torch.no_grad():
        y_ref = reference.pera_linear(x, W, bias, A, B, h, s, terms).float()
        y_auth = reference.pera_linear_authors(x, W, bias, A, B, h, s, terms).float()
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        err = ((y_ref - y_auth).abs().max() / y_ref.abs().max().clamp_min(1e-6)).item()
        if err > tol:
            raise AssertionError(f"reference and authors disagree: max rel diff {err:.3e}")
    return {"linear": run_linear, "reference": run_reference, "authors": run_authors}


def time_case(fns: Dict[str, Callable], device: torch.device, warmup: int, min_runs: int,
              max_runs: int, min_time_s: float) -> Dict[str, float]:
    """Median milliseconds per variant: ``warmup`` rounds, then rounds (each runs every variant
    once, interleaved) until ``min_runs`` rounds and ``min_time_s`` of total timed work are done,
    or ``max_runs`` rounds."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    if cuda:
        torch.cuda.synchronize(device)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    total, rounds = 0.0, 0
    while rounds < max_runs and (rounds < min_runs or total < min_time_s):
        for name, fn in fns.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                fn()
                ms = (time.perf_counter() - t0) * 1e3
            times[name].append(ms)
            total += ms / 1e3
        rounds += 1
    return {k: statistics.median(v) for k, v in times.items()} | {"runs": rounds}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype of x and W (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--N", type=int, nargs="+", default=[256, 2048], help="tokens per call")
    p.add_argument("--dim", type=int, nargs="+", default=[512, 1024], help="in = out features")
    p.add_argument("--r", type=int, nargs="+", default=[8, 16], help="ranks")
    p.add_argument("--terms", nargs="+", default=["full"], choices=list(reference.PERA_TERMS))
    p.add_argument("--warmup", type=int, default=3, help="warm-up rounds per shape")
    p.add_argument("--min-runs", type=int, default=20, help="least timed rounds per shape")
    p.add_argument("--max-runs", type=int, default=200, help="most timed rounds per shape")
    p.add_argument("--min-time", type=float, default=1.5,
                   help="least seconds of timed work per shape (all variants together)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own choice); 1 gives steadier CPU "
                        "timings on small shared machines")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    lines = header(device, dtype)
    print("\n".join(lines), flush=True)

    cols = (f"{'N':>5} {'in':>5} {'out':>5} {'r':>3} {'terms':>6} {'R':>4} {'runs':>5} "
            f"{'linear ms':>10} {'ref ms':>9} {'authors ms':>10} {'ref/lin':>8} "
            f"{'auth/lin':>8} {'auth/ref':>8}")
    print(cols)
    print("-" * len(cols), flush=True)
    rows = []
    t_start = time.perf_counter()
    for N in args.N:
        for dim in args.dim:
            for r in args.r:
                for terms in args.terms:
                    fns = make_case(N, dim, dim, r, terms, device, dtype)
                    t = time_case(fns, device, args.warmup, args.min_runs, args.max_runs,
                                  args.min_time)
                    R = r + reference.pera_num_pairs(r, terms)
                    row = {"N": N, "in": dim, "out": dim, "r": r, "terms": terms, "R": R,
                           "runs": t["runs"], "device": str(device),
                           "dtype": str(dtype).replace("torch.", ""),
                           **{f"{k}_ms": t[k] for k in VARIANTS},
                           "reference_over_linear": t["reference"] / t["linear"],
                           "authors_over_linear": t["authors"] / t["linear"],
                           "authors_over_reference": t["authors"] / t["reference"]}
                    rows.append(row)
                    print(f"{N:>5} {dim:>5} {dim:>5} {r:>3} {terms:>6} {R:>4} {t['runs']:>5} "
                          f"{t['linear']:>10.3f} {t['reference']:>9.3f} {t['authors']:>10.3f} "
                          f"{row['reference_over_linear']:>8.2f} "
                          f"{row['authors_over_linear']:>8.2f} "
                          f"{row['authors_over_reference']:>8.2f}", flush=True)
    print("-" * len(cols))
    faster = sum(r["reference_ms"] <= r["authors_ms"] for r in rows)
    not_slower = sum(r["reference_ms"] <= NOISE * r["authors_ms"] for r in rows)
    geo = statistics.geometric_mean([r["authors_over_reference"] for r in rows])
    print(f"reference <= authors on {faster}/{len(rows)} shapes, <= {NOISE:g} x authors (not "
          f"slower within timing noise) on {not_slower}/{len(rows)}; authors/reference geometric "
          f"mean {geo:.2f}x (> 1: the reference is faster)")
    print(f"wall {time.perf_counter() - t_start:.1f} s{load_average()}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"header": lines, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
