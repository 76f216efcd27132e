"""Per-layer benchmarks: one adapted layer's training step (forward + backward into x and the
adapter; "fwd": forward under no_grad), bf16, frozen weight, against a frozen nn.Linear of the
same shape timed in the same test.

    pytest bench/ --benchmark-only --benchmark-json=bench/results/layers_h100.json
    pytest bench/ --benchmark-only -k "not sweep"            # the table's cases alone
    pytest bench/ --benchmark-only --benchmark-compare --benchmark-compare-fail=median:5%

pytest-benchmark times one CUDA-synchronised step (`stats`, what --benchmark-compare checks).
`extra_info` holds the case and the ratios to the frozen layer (bench/timing.py: medians of
per-pair ratios, the two timed alternately):
  ratio         one synchronised step each (latency; the host's launch path shows);
  ratio_stream  10 steps back to back (throughput, as a training loop runs);
  ratio_graph   the step captured in a CUDA graph and replayed, against the frozen step
                captured the same way (GPU-bound; polykern, frozen_linear and lora_eager);
  peak_extra_MiB  a step's peak memory above what lives between steps (polykern, naive,
                frozen_linear; fwd+bwd).
bench/report.py turns the JSON into the README's tables and bench/results/layers_h100.png.

Implementations: polykern (the CUDA ops through PeraLinear / GenLoraLinear), naive (the reference:
the same math in PyTorch), authors (the PERA authors' formulation), compiled_naive
(torch.compile of naive), lora_eager (plain LoRA r=16 in PyTorch), peft_lora / peft_lora_fp32
(peft's LoRA layer, bf16 / its default fp32 adapters), merged (a merged layer: one F.linear),
frozen_linear. Adapter parameters are random, never the zero initialisation.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timing

DT = torch.bfloat16
REPS = 30
GRAPHED = ("frozen_linear", "polykern", "lora_eager")  # also timed as a captured step
PEAK = ("frozen_linear", "polykern", "naive")


@dataclass(frozen=True)
class Case:
    op: str          # "pera" or "genlora"
    r: int
    N: int           # tokens (rows of x)
    n: int = 4096    # in_features
    m: int = 4096    # out_features
    terms: str = "full"  # PERA's expansion terms
    K: int = 32      # GenLoRA's RBFs
    modes: tuple = ("fwd+bwd",)
    impls: tuple = ("polykern", "naive", "lora_eager", "merged")
    sweep: bool = False  # a point of the ratio-against-N plot only

    @property
    def name(self) -> str:
        kind = f"pera-{self.terms}-r{self.r}" if self.op == "pera" else \
            f"genlora-r{self.r}-K{self.K}"
        return f"{kind}-N{self.N}-{self.n}x{self.m}"


MAIN = ("polykern", "naive", "lora_eager", "merged")
CASES = [
    Case("pera", 16, 8192, modes=("fwd+bwd", "fwd"),
         impls=MAIN + ("authors", "compiled_naive", "peft_lora", "peft_lora_fp32")),
    Case("pera", 16, 8192, terms="square", impls=MAIN + ("authors",)),
    Case("pera", 32, 8192, impls=MAIN + ("authors",)),
    Case("pera", 16, 2048, impls=MAIN + ("authors",)),
    Case("pera", 16, 512, impls=MAIN + ("authors",)),
    Case("pera", 16, 8192, m=14336, impls=MAIN + ("authors",)),
    Case("genlora", 16, 8192, modes=("fwd+bwd", "fwd"), impls=MAIN + ("compiled_naive",)),
    Case("genlora", 64, 8192, K=64),
    Case("genlora", 16, 2048),
]
# the ratio-against-N plot: PERA full r=16 and GenLoRA r=16 K=32 at the N the cases above miss
CASES += [Case("pera", 16, N, impls=("polykern", "naive", "lora_eager"), sweep=True)
          for N in (1024, 4096, 16384)]
CASES += [Case("genlora", 16, N, impls=("polykern", "naive"), sweep=True)
          for N in (512, 1024, 4096, 16384)]

PARAMS = [pytest.param(c, mode, impl, id=f"{c.name}-{mode}-{impl}"
                       + ("-sweep" if c.sweep else ""))
          for c in CASES for mode in c.modes for impl in ("frozen_linear",) + c.impls]


@torch.no_grad()
def _randomize(params, scale=0.02):
    for p in params:
        p.copy_(torch.randn_like(p) * scale)


def build(case: Case, impl: str, base: nn.Linear):
    """(forward callable, trainable parameters) of `impl` on the frozen layer `base`."""
    import polykern
    from polykern import reference as ref
    n, m, dev = case.n, case.m, base.weight.device
    W = base.weight
    if impl == "frozen_linear":
        return base, []
    if impl == "lora_eager":
        lA = torch.randn(16, n, device=dev, dtype=DT) * 0.02
        lB = torch.randn(m, 16, device=dev, dtype=DT) * 0.02
        lA.requires_grad_(), lB.requires_grad_()
        return (lambda x: F.linear(x, W) + F.linear(F.linear(x, lA), lB)), [lA, lB]
    if impl in ("peft_lora", "peft_lora_fp32"):
        peft = pytest.importorskip("peft", reason="peft baselines need peft")
        holder = nn.Sequential()
        holder.add_module("proj", base)
        cfg = peft.LoraConfig(r=16, lora_alpha=16, target_modules=["proj"])
        pm = peft.get_peft_model(holder, cfg, autocast_adapter_dtype=impl == "peft_lora_fp32")
        layer = pm.base_model.model.proj
        params = [p for p in layer.parameters() if p.requires_grad]
        _randomize(params)
        return layer, params
    if impl == "merged":
        cls = polykern.PeraLinear if case.op == "pera" else polykern.GenLoraLinear
        cfg = {"terms": case.terms} if case.op == "pera" else {"num_rbf": case.K}
        own = nn.Linear(n, m, bias=False, device=dev, dtype=DT)  # merge() writes the weight
        layer = cls.from_linear(own, r=case.r, **cfg)
        _randomize(layer.adapter_parameters())
        layer.merge()
        return layer, []
    if case.op == "pera":
        layer = polykern.PeraLinear.from_linear(base, r=case.r, terms=case.terms)
        _randomize(layer.adapter_parameters())
        A, B, h = params = list(layer.adapter_parameters())
        s, terms = layer.scaling, case.terms
        naive = lambda x: ref.pera_linear(x, W, None, A, B, h, s, terms)  # noqa: E731
        authors = lambda x: ref.pera_linear_authors(x, W, None, A, B, h, s, terms)  # noqa: E731
    else:
        layer = polykern.GenLoraLinear.from_linear(base, r=case.r, num_rbf=case.K)
        with torch.no_grad():
            layer.genlora_b_mix.normal_(0, 0.02)  # B's mix starts at zero: no adapter output
        params = list(layer.adapter_parameters())
        naive = lambda x: ref.genlora_linear(x, W, None, *params, layer.scaling)  # noqa: E731
        authors = None
    if impl == "compiled_naive":
        return torch.compile(naive), params
    return {"polykern": layer, "naive": naive, "authors": authors}[impl], params


@pytest.mark.gpu
@pytest.mark.parametrize("case, mode, impl", PARAMS)
def test_layer(benchmark, case: Case, mode: str, impl: str):
    torch.manual_seed(0)
    base = nn.Linear(case.n, case.m, bias=False, device="cuda", dtype=DT).requires_grad_(False)
    x = torch.randn(case.N, case.n, device="cuda", dtype=DT, requires_grad=True)
    gy = torch.randn(case.N, case.m, device="cuda", dtype=DT)
    forward, params = build(case, impl, base)
    frozen = timing.step(base, x, gy, [], mode)
    fn = timing.step(forward, x, gy, params, mode)
    info = benchmark.extra_info
    info.update(op=case.op, terms=case.terms if case.op == "pera" else None, r=case.r,
                K=case.K if case.op == "genlora" else None, N=case.N, n=case.n, m=case.m,
                dtype="bfloat16", mode=mode, impl=impl, sweep=case.sweep)
    # pytest-benchmark's own numbers: one synchronised step (after warm-up, which also times
    # the adapter GEMMs' algorithms)
    benchmark.pedantic(timing.synced(fn), rounds=REPS, warmup_rounds=5, iterations=1)
    reps = 20 if case.sweep else REPS
    if impl == "frozen_linear":
        info.update(ratio=1.0, ratio_stream=1.0)
    else:
        info["frozen_ms"], info["ms"], info["ratio"] = timing.time_pair(frozen, fn, reps)
        _, info["ms_stream"], info["ratio_stream"] = timing.time_pair(
            frozen, fn, reps, steps=timing.STREAM)
    if impl in GRAPHED:
        check = [x] + params if mode == "fwd+bwd" else []
        g_frozen = timing.graphed(frozen, [x] if mode == "fwd+bwd" else [])
        g_fn = g_frozen if impl == "frozen_linear" else timing.graphed(fn, check)
        _, info["ms_graph"], info["ratio_graph"] = timing.time_pair(g_frozen, g_fn, reps)
        del g_frozen, g_fn
    if impl in PEAK and mode == "fwd+bwd" and not case.sweep:
        info["peak_extra_MiB"] = round(timing.peak_extra_mib(fn), 1)
    for k in ("frozen_ms", "ms", "ms_stream", "ms_graph"):
        if k in info:
            info[k] = round(info[k], 4)
    for k in ("ratio", "ratio_stream", "ratio_graph"):
        info[k] = round(info[k], 3) if k in info else None
