"""The timing helpers every benchmark in bench/ shares: CUDA-synchronised steps, a step captured
whole in a CUDA graph, the frozen-layer ratio, peak memory, and the GPU check.

A ratio is the median of per-pair ratios: the implementation's runs alternate with the frozen
layer's, each run timed with CUDA events, so that clock and host drift during a run move both
sides of a ratio alike.
"""
from __future__ import annotations

import statistics
import sys
from typing import Callable, Optional, Sequence

import torch

STREAM = 10  # steps per timed run in the back-to-back (throughput) timing


def gpu_unavailable_reason() -> Optional[str]:
    """Why the CUDA benchmarks cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    import polykern
    if not polykern.cuda_available():
        return ("needs polykern's compiled CUDA extension (polykern.cuda_available() is False: "
                "install with the CUDA build of torch and nvcc, see README.md)")
    return None


def require_gpu(script: str) -> None:
    """For the GPU-only scripts: say what is needed and exit with status 2 without one."""
    reason = gpu_unavailable_reason()
    if reason:
        print(f"{script}: {reason}", file=sys.stderr)
        sys.exit(2)


def step(forward: Callable, x: torch.Tensor, gy: torch.Tensor, params: Sequence[torch.Tensor],
         mode: str) -> Callable[[], None]:
    """One training step of a layer: forward, and for mode "fwd+bwd" the backward of gy into x
    and params (gradients dropped first, as zero_grad(set_to_none=True) does). Mode "fwd": the
    forward under no_grad. No synchronisation: see synced()."""
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


def synced(fn: Callable[[], None], steps: int = 1) -> Callable[[], None]:
    """fn run `steps` times then torch.cuda.synchronize(): what a wall-clock timer (pytest-
    benchmark's) must time, since CUDA launches return before the GPU finishes."""
    def run():
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    return run


def graphed(fn: Callable[[], None], check: Sequence[torch.Tensor] = ()) -> Callable[[], None]:
    """fn captured whole in a CUDA graph (torch.cuda.graphs' recipe: warm-up on a side stream,
    static buffers), returned as its replay. check: tensors whose .grad one replay must
    reproduce (within bf16 rounding: cuBLAS may pick other kernels under capture)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    want = [t.grad.clone() for t in check if t.grad is not None]
    for t in check:
        t.grad = None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    for w, t in zip(want, check):
        torch.testing.assert_close(t.grad.float(), w.float(), rtol=2e-2,
                                   atol=2e-2 * w.abs().max().item())

    def replay():
        g.replay()
    replay.graph = g  # the graph (and its memory pool) lives as long as the callable
    return replay


def _event_ms(fn: Callable[[], None], steps: int) -> float:
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(steps):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / steps


def time_pair(base_fn: Callable[[], None], fn: Callable[[], None], reps: int = 30,
              warmup: int = 5, steps: int = 1) -> tuple[float, float, float]:
    """(median ms of base_fn, median ms of fn, median of the per-pair ratios fn / base_fn).
    steps = 1: each run is one synchronised step (latency: the host's launch path shows whenever
    it is slower than the GPU); steps > 1: `steps` calls back to back per run, divided by
    `steps` (throughput, as in a training loop where the host runs ahead of the GPU)."""
    for _ in range(warmup):
        base_fn()
        fn()
    torch.cuda.synchronize()
    tb, tf, ratios = [], [], []
    for _ in range(reps):
        b = _event_ms(base_fn, steps)
        f = _event_ms(fn, steps)
        tb.append(b)
        tf.append(f)
        ratios.append(f / b)
    med = statistics.median
    return med(tb), med(tf), med(ratios)


def peak_extra_mib(fn: Callable[[], None]) -> float:
    """A step's peak allocated memory above what lives between steps (the previous step's
    gradients included, as in a training loop), in MiB."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def environment() -> dict:
    """GPU, torch and CUDA versions, for every results file."""
    return {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "cuda": torch.version.cuda}
