"""Benchmark of one adapted layer, forward+backward (and forward only), bf16, frozen weight, x
requiring grad, as a ratio to a frozen nn.Linear of the same shape measured in the same run.

Implementations (``impl``): polykern (the CUDA ops), authors (the authors' formulation), naive (the
reference: same math, cached gather indices), compiled_naive (torch.compile of naive), lora_eager
(plain LoRA r=16 in PyTorch), peft_lora / peft_lora_fp32 (peft's LoRA layer with bf16 / its default
fp32 adapters), frozen_linear, merged (a merged layer). Each implementation's runs alternate with
the frozen layer's; ``ratio`` is the median of the per-pair ratios (``time_pair``), ``ms`` the
median time; ``*_stream`` the same for 10 steps back to back. Adapter parameters random (never
zeros). Each case also times frozen_linear, polykern and lora_eager with the host path changed
(``--variants``, default ``graph``; rows with ``"variant"``): ``graph``, the step captured in a
CUDA graph and replayed (the host's launch path removed: the GPU-bound ratio); ``caller_thread``,
the autograd engine run on the calling thread. ``ratio`` there is against the frozen layer's step
run the same way, ``ratio_vs_eager_frozen`` against the plain eager frozen step.
``peak_extra_MiB``: a step's peak allocated memory above what lives between steps (the previous
step's gradients included), polykern and naive.

    python bench/bench_layers.py --json bench/results/h100.json --plot bench/results/ratio_vs_N.png
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import polykern
from polykern import GenLoraLinear, PeraLinear, ops
from polykern import reference as ref

DEV = "cuda"
DT = torch.bfloat16
STREAM = 10  # steps per timed run for the back-to-back (throughput) columns


def _timed(fn, batch):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(batch):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / batch


def time_pair(base_fn, fn, reps=30, warmup=5, batch=1):
    """(median ms of base_fn, median ms of fn, median of the per-pair ratios fn / base_fn): the
    two alternate, each run CUDA-event-timed after ``warmup`` runs of both, so that clock and
    host drift during the run moves both sides of a ratio alike. With ``batch`` = 1 a run is one
    synchronised call (latency: the host's launch path is exposed whenever it is slower than the
    GPU); with ``batch`` > 1 it is ``batch`` calls back to back, divided by ``batch``
    (throughput, as in a training loop where the host runs ahead of the GPU)."""
    for _ in range(warmup):
        base_fn()
        fn()
    torch.cuda.synchronize()
    tb, tf, ratios = [], [], []
    for _ in range(reps):
        b = _timed(base_fn, batch)
        f = _timed(fn, batch)
        tb.append(b), tf.append(f), ratios.append(f / b)
    med = statistics.median
    return med(tb), med(tf), med(ratios)


@torch.no_grad()
def randomize(params, scale=0.02):
    for p in params:
        p.copy_(torch.randn_like(p) * scale)


def step_fn(forward, x, gy, params, mode):
    """One timed step: forward (+ backward into x and the trainable params)."""
    def fn():
        for p in params:
            p.grad = None
        x.grad = None
        if mode == "fwd":
            with torch.no_grad():
                forward(x)
        else:
            forward(x).backward(gy)
    return fn


def graph_fn(forward, x, gy, params, mode):
    """The step of ``step_fn`` captured in a CUDA graph (static x, gy and gradient buffers, as in
    torch.cuda.graphs' whole-step recipe): returns the graph's replay, after checking that one
    replay gives the eager step's gradients."""
    eager = step_fn(forward, x, gy, params, mode)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up (and GEMM tuning) outside the capture
        for _ in range(3):
            eager()
    torch.cuda.current_stream().wait_stream(s)
    want = [t.grad.clone() for t in [x] + params] if mode != "fwd" else []
    for t in [x] + params:
        t.grad = None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        if mode == "fwd":
            with torch.no_grad():
                forward(x)
        else:
            forward(x).backward(gy)
    g.replay()
    torch.cuda.synchronize()
    for w, t in zip(want, [x] + params):  # the graph did the step's work (the kernels may
        # differ from eager's where cuBLAS picks another algorithm under capture)
        torch.testing.assert_close(t.grad.float(), w.float(), rtol=2e-2,
                                   atol=2e-2 * w.abs().max().item())
    def fn():
        g.replay()
    fn.graph = g  # keep the graph (and its memory pool) alive with the callable
    return fn


def make_impls(op, r, K, n, m, terms, with_compile, with_peft):
    """name -> (forward callable, trainable params)."""
    torch.manual_seed(0)
    base = nn.Linear(n, m, bias=False, device=DEV, dtype=DT).requires_grad_(False)
    W = base.weight
    impls = {"frozen_linear": (base, [])}
    if op == "pera":
        layer = PeraLinear.from_linear(base, r=r, terms=terms)
        randomize(layer.adapter_parameters())
        A, B, h = layer.adapter_parameters()
        s = layer.scaling
        impls["polykern"] = (layer, [A, B, h])
        naive = lambda x: ref.pera_linear(x, W, None, A, B, h, s, terms)  # noqa: E731
        impls["naive"] = (naive, [A, B, h])
        impls["authors"] = (lambda x: ref.pera_linear_authors(x, W, None, A, B, h, s, terms),
                            [A, B, h])
        if with_compile:
            impls["compiled_naive"] = (torch.compile(naive), [A, B, h])
        merged = PeraLinear.from_linear(nn.Linear(n, m, bias=False, device=DEV, dtype=DT),
                                        r=r, terms=terms)
    else:
        layer = GenLoraLinear.from_linear(base, r=r, num_rbf=K)
        with torch.no_grad():
            layer.genlora_b_mix.normal_(0, 0.02)
        params = layer.adapter_parameters()
        impls["polykern"] = (layer, params)
        naive = lambda x: ref.genlora_linear(x, W, None, *params, layer.scaling)  # noqa: E731
        impls["naive"] = (naive, params)
        if with_compile:
            impls["compiled_naive"] = (torch.compile(naive), params)
        merged = GenLoraLinear.from_linear(nn.Linear(n, m, bias=False, device=DEV, dtype=DT),
                                           r=r, num_rbf=K)
    merged.merge()
    impls["merged"] = (merged, [])
    # plain LoRA r=16 in eager PyTorch
    lA = torch.randn(16, n, device=DEV, dtype=DT, requires_grad=True)
    lB = torch.randn(m, 16, device=DEV, dtype=DT, requires_grad=True)
    with torch.no_grad():
        lA.mul_(0.02), lB.mul_(0.02)
    impls["lora_eager"] = (lambda x: F.linear(x, W) + F.linear(F.linear(x, lA), lB), [lA, lB])
    if with_peft:
        try:
            import peft
            for name, autocast_fp32 in (("peft_lora", False), ("peft_lora_fp32", True)):
                holder = nn.Sequential()
                holder.add_module("proj", nn.Linear(n, m, bias=False, device=DEV, dtype=DT))
                holder.proj.weight.data.copy_(W)
                cfg = peft.LoraConfig(r=16, lora_alpha=16, target_modules=["proj"])
                pm = peft.get_peft_model(holder, cfg, autocast_adapter_dtype=autocast_fp32)
                pl = pm.base_model.model.proj
                tr = [p for p in pl.parameters() if p.requires_grad]
                randomize(tr)
                impls[name] = (pl, tr)
        except Exception as e:  # report, do not hide
            print(f"peft baseline unavailable: {e!r}", file=sys.stderr)
    return impls


def bench_case(op, r, K, N, n, m, terms, modes, impl_filter=None, with_compile=False,
               with_peft=False, reps=30, variants=()):
    impls = make_impls(op, r, K, n, m, terms, with_compile, with_peft)
    x = torch.randn(N, n, device=DEV, dtype=DT, requires_grad=True)
    gy = torch.randn(N, m, device=DEV, dtype=DT)
    rows = []
    for mode in modes:
        base_fn = step_fn(impls["frozen_linear"][0], x, gy, [], mode)
        base_ms = time_pair(base_fn, base_fn, reps)[0]
        base_tp = time_pair(base_fn, base_fn, reps, batch=STREAM)[0]
        for name, (fwd, params) in impls.items():
            if impl_filter and name not in impl_filter and name != "frozen_linear":
                continue
            if name == "frozen_linear":
                ms, ratio, tp, ratio_tp = base_ms, 1.0, base_tp, 1.0
            else:
                fn = step_fn(fwd, x, gy, params, mode)
                _, ms, ratio = time_pair(base_fn, fn, reps)
                _, tp, ratio_tp = time_pair(base_fn, fn, reps, batch=STREAM)
            row = {"op": op, "terms": terms if op == "pera" else None, "r": r, "N": N, "in": n,
                   "out": m, "dtype": "bfloat16", "mode": mode, "impl": name,
                   "ms": round(ms, 4), "ratio": round(ratio, 3),
                   "ms_stream": round(tp, 4), "ratio_stream": round(ratio_tp, 3)}
            if op == "genlora":
                row["K"] = K
            rows.append(row)
        for variant in variants:
            rows += variant_rows(variant, impls, x, gy, mode, base_fn, reps,
                                 {k: row[k] for k in ("op", "terms", "r", "N", "in", "out",
                                                      "dtype", "mode") if k in row},
                                 K if op == "genlora" else None)
        if "polykern" in impls and mode == "fwd+bwd":
            # the memory the op graphs' pools hold for this case (outputs and temporaries of one
            # forward and one backward graph), then the peaks on the plain path: op graphs keep
            # their outputs' storage allocated, which a peak over one step would not count
            ops.clear_op_graphs()
            fn = step_fn(impls["polykern"][0], x, gy, impls["polykern"][1], mode)
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            rows.append({"op": op, "terms": terms if op == "pera" else None, "r": r,
                         "N": N, "in": n, "out": m, "dtype": "bfloat16", "mode": mode,
                         "impl": "polykern", "metric": "op_graph_pool_MiB",
                         "value": round(ops.op_graph_stats()["bytes"] / 2**20, 1)})
            del fn
            ops.clear_op_graphs()
            torch.cuda.synchronize()
            for name in ("polykern", "naive"):
                # steady state, as in a training loop: the previous step's gradients are alive
                # when a step starts (and freed by it); the peak is counted above that
                fn = step_fn(impls[name][0], x, gy, impls[name][1], mode)
                with variant_setting("no_op_graphs"):
                    fn()
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                    fn()
                    torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - before) / 2**20
                rows.append({"op": op, "terms": terms if op == "pera" else None, "r": r,
                             "N": N, "in": n, "out": m, "dtype": "bfloat16", "mode": mode,
                             "impl": name, "metric": "peak_extra_MiB", "value": round(peak, 1)})
    return rows


def caller_thread_fn(forward, x, gy, params, mode):
    """The step of ``step_fn`` with the autograd engine on the calling thread
    (``torch.autograd.set_multithreading_enabled(False)``): no hand-over of the backward to the
    engine's CUDA device thread."""
    eager = step_fn(forward, x, gy, params, mode)

    def fn():
        with torch.autograd.set_multithreading_enabled(False):
            eager()
    return fn


VARIANTS = {"graph": graph_fn, "caller_thread": caller_thread_fn,
            # the plain eager step with polykern's op graphs off (version 11's switch), timed
            # in the same run as the default (on) for the before/after of that change
            "no_op_graphs": step_fn}


@contextlib.contextmanager
def variant_setting(variant):
    """Process-wide settings a variant runs under (op graphs off for "no_op_graphs")."""
    if variant != "no_op_graphs":
        yield
        return
    old = ops.set_op_graphs(False)
    try:
        yield
    finally:
        ops.set_op_graphs(old)
        ops.clear_op_graphs()


def variant_rows(variant, impls, x, gy, mode, eager_base_fn, reps, key, K):
    """Rows for the steps of frozen_linear, polykern and lora_eager run the way ``variant``
    names (``VARIANTS``): ``ratio`` against the frozen layer's step run the same way,
    ``ratio_vs_eager_frozen`` against the plain eager frozen step."""
    make = VARIANTS[variant]
    rows = []
    with variant_setting(variant):
        base_v = make(impls["frozen_linear"][0], x, gy, [], mode)
        base_ms = time_pair(base_v, base_v, reps)[0]
        for name in ("frozen_linear", "polykern", "lora_eager"):
            if name not in impls:
                continue
            fwd, params = impls[name]
            fn = base_v if name == "frozen_linear" else make(fwd, x, gy, params, mode)
            if name == "frozen_linear":
                ms, ratio = base_ms, 1.0
            else:
                _, ms, ratio = time_pair(base_v, fn, reps)
            _, _, ratio_eager = time_pair(eager_base_fn, fn, reps)
            row = dict(key, impl=name, variant=variant, ms=round(ms, 4), ratio=round(ratio, 3),
                       ratio_vs_eager_frozen=round(ratio_eager, 3))
            if variant == "no_op_graphs" and name == "polykern":
                _, _, row["ratio_stream"] = time_pair(base_v, fn, reps, batch=STREAM)
                row["ratio_stream"] = round(row["ratio_stream"], 3)
            if K is not None:
                row["K"] = K
            rows.append(row)
            del fn
    for t in [x] + [p for _, ps in impls.values() for p in ps]:
        t.grad = None
    del base_v
    torch.cuda.empty_cache()
    return rows


def adapter_width(op, r, terms):
    return r + ref.pera_num_pairs(r, terms) if op == "pera" else r


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--plot", help="write the ratio-vs-N plot (PNG) here")
    ap.add_argument("--quick", action="store_true", help="fewer cases (smoke run)")
    ap.add_argument("--cases", default=None,
                    help="comma-separated indices into the case list (no N sweep, no compile or "
                         "peft baselines): a quick look at chosen rows")
    ap.add_argument("--variants", default="graph,no_op_graphs",
                    help="comma-separated host-path variants timed besides plain eager "
                         f"(of {sorted(VARIANTS)}; '' for none)")
    args = ap.parse_args()
    assert polykern.cuda_available(), "needs a GPU and the compiled extension"
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}: expected one of {sorted(VARIANTS)}")
    rows = []
    n = m = 4096
    cases = [  # (op, r, K, N, in, out, terms, modes, compile, peft)
        ("pera", 16, None, 8192, n, m, "full", ["fwd+bwd", "fwd"], True, True),
        ("pera", 16, None, 8192, n, m, "square", ["fwd+bwd"], False, False),
        ("pera", 32, None, 8192, n, m, "full", ["fwd+bwd"], False, False),
        ("pera", 16, None, 2048, n, m, "full", ["fwd+bwd"], False, False),
        ("pera", 16, None, 512, n, m, "full", ["fwd+bwd"], False, False),
        ("pera", 16, None, 8192, n, 14336, "full", ["fwd+bwd"], False, False),
        ("genlora", 16, 32, 8192, n, m, None, ["fwd+bwd", "fwd"], True, False),
        ("genlora", 64, 64, 8192, n, m, None, ["fwd+bwd"], False, False),
        ("genlora", 16, 32, 2048, n, m, None, ["fwd+bwd"], False, False),
    ]
    if args.quick:
        cases = cases[:1]
    if args.cases:
        cases = [c[:8] + (False, False) for k, c in enumerate(cases)
                 if str(k) in args.cases.split(",")]
    for op, r, K, N, i, o, terms, modes, comp, pf in cases:
        rows += bench_case(op, r, K, N, i, o, terms, modes, with_compile=comp, with_peft=pf,
                           variants=variants)
        print_rows([x for x in rows if x.get("N") == N and x["op"] == op and x["r"] == r][-12:])
    sweep = []
    if not (args.quick or args.cases):
        for N in (512, 1024, 2048, 4096, 8192, 16384):
            graph = ("graph",) if "graph" in variants else ()
            sweep += bench_case("pera", 16, None, N, n, m, "full", ["fwd+bwd"],
                                impl_filter={"polykern", "naive", "lora_eager"}, reps=20,
                                variants=graph)
            sweep += bench_case("genlora", 16, 32, N, n, m, None, ["fwd+bwd"],
                                impl_filter={"polykern", "naive"}, reps=20, variants=graph)
        rows += [dict(x, sweep=True) for x in sweep]
    # the adapter's own cost: (polykern - frozen) against its FLOPs, 6 N R (in + out) fwd+bwd,
    # from the 10-back-to-back timings (GPU-bound; a single eager step of the frozen layer can
    # take longer than polykern's, which made this a division by ~0 up to version 11); None
    # where the difference is not positive
    for x in rows:
        if (x.get("impl") == "polykern" and "ms" in x and x["mode"] == "fwd+bwd"
                and not x.get("variant")):
            base = next(b for b in rows if b.get("impl") == "frozen_linear" and not b.get("variant")
                        and b["op"] == x["op"]
                        and b["N"] == x["N"] and b["r"] == x["r"] and b["out"] == x["out"]
                        and b["mode"] == x["mode"] and b.get("terms") == x.get("terms"))
            R = adapter_width(x["op"], x["r"], x["terms"] or "full")
            flops = 6 * x["N"] * R * (x["in"] + x["out"])
            extra = x["ms_stream"] - base["ms_stream"]
            x["adapter_extra_ms"] = round(extra, 4)
            x["adapter_TFLOPs"] = round(flops / extra / 1e9, 1) if extra > 0 else None
            x["flop_floor_ratio"] = round(1 + flops / (4 * x["N"] * x["in"] * x["out"]), 3)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(meta, f, indent=1)
    if args.plot and sweep:
        plot(sweep, args.plot, meta["gpu"])
    print("\nall rows:")
    print_rows(rows)


def print_rows(rows):
    for x in rows:
        if x.get("variant"):
            print(f"{x['op']:8s} {str(x.get('terms')):6s} r={x['r']:<3d} K={x.get('K', '-')!s:4s}"
                  f" N={x['N']:<6d} {x['in']}x{x['out']:<6d} {x['mode']:8s} {x['impl']:15s}"
                  f" {x['ms']:8.3f} ms  {x['ratio']:6.2f}x  {x['variant']} (vs eager frozen "
                  f"{x['ratio_vs_eager_frozen']:.2f}x)"
                  + (f" stream {x['ratio_stream']:.2f}x" if "ratio_stream" in x else ""))
        elif "ms" in x:
            extra = f"  adapter {x['adapter_TFLOPs']} TFLOP/s, floor {x['flop_floor_ratio']}x" \
                if "adapter_TFLOPs" in x else ""
            print(f"{x['op']:8s} {str(x.get('terms')):6s} r={x['r']:<3d} K={x.get('K', '-')!s:4s}"
                  f" N={x['N']:<6d} {x['in']}x{x['out']:<6d} {x['mode']:8s} {x['impl']:15s}"
                  f" {x['ms']:8.3f} ms  {x['ratio']:6.2f}x  stream {x['ms_stream']:8.3f} ms "
                  f"{x['ratio_stream']:6.2f}x{extra}")
        else:
            print(f"{x['op']:8s} r={x['r']} N={x['N']} {x['impl']:15s} {x['metric']} "
                  f"{x['value']}")
    sys.stdout.flush()


def plot(sweep, path, gpu):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    graphed = any(x.get("variant") == "graph" for x in sweep)
    panels = [("ratio", None, "one synchronised step (latency)"),
              ("ratio_stream", None, "10 steps back to back (throughput)")]
    if graphed:
        panels.append(("ratio", "graph", "step captured in a CUDA graph\n(vs the frozen step "
                                         "captured the same way)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), sharey=True)
    for ax, (key, variant, title) in zip(axes, panels):
        for op, impl, style, color in (("pera", "polykern", "o-", "C0"),
                                       ("pera", "naive", "s--", "C1"),
                                       ("pera", "lora_eager", "^:", "C2"),
                                       ("genlora", "polykern", "o-", "C3"),
                                       ("genlora", "naive", "s--", "C4")):
            pts = sorted((x["N"], x[key]) for x in sweep
                         if x["op"] == op and x["impl"] == impl and key in x
                         and x.get("variant") == variant)
            if pts:
                label = f"{op} {impl}" if impl != "lora_eager" else "plain LoRA r=16 (eager)"
                if variant == "graph" and impl == "lora_eager":
                    label = "plain LoRA r=16 (PyTorch)"
                ax.plot(*zip(*pts), style, color=color, label=label)
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("N (tokens)")
        ax.set_title(title)
    axes[0].set_ylabel("time / frozen nn.Linear (fwd+bwd)")
    axes[0].legend()
    if graphed:
        axes[-1].legend()
    fig.suptitle(f"4096x4096 bf16, PERA full r=16, GenLoRA r=16 K=32 ({gpu})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
