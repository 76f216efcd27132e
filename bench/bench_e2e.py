"""End-to-end fine-tuning benchmark: a Llama-3-8B-shaped model (random weights, no hub access),
adapters on all seven projections of every decoder layer, one training step = forward + LM loss +
backward + fused AdamW on the trainable parameters. Per (implementation, workload, checkpointing):
the median step time over the timed steps after warm-up, tokens/s, the peak allocated memory
of a step above what lives between steps (weights, adapters, optimizer state), and the loss of
the first and last timed step (finite; the adapters train on a fixed token pool, so it goes
down). All models are built first and their steps interleaved (run_workload).

Workloads: ``4x2048`` and ``1x2048`` (fixed length), ``varlen4x1024-2048`` and
``varlen1x1024-2048`` (a new length every step, uniform in [1024, 2048], fixed seed: what padding
each batch to its longest sequence gives). ``--new-n`` adds per-layer rows: 50 training steps of
one 4096 x 4096 layer, each at a token count not seen before, against the frozen layer doing the
same.

    python bench/bench_e2e.py --json bench/results/e2e_h100.json
    python bench/bench_e2e.py --impls frozen,polykern_pera_full --workloads 4x2048 --layers 2
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import random
import statistics
import sys
import time

IMPLS = ("frozen", "peft_lora_bf16", "peft_lora_fp32", "polykern_lora", "polykern_pera_full",
         "polykern_pera_square", "polykern_genlora", "authors_pera", "reference_pera",
         "peft_bridge_pera")
WORKLOADS = ("4x2048", "1x2048", "varlen4x1024-2048", "varlen1x1024-2048")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16


def need_gpu():
    """The benchmark needs a CUDA GPU, torch with CUDA, transformers and peft: say so and exit 2."""
    try:
        import torch
        import transformers  # noqa: F401
        import peft  # noqa: F401
    except ImportError as e:
        sys.exit(f"bench_e2e.py needs torch, transformers and peft: {e}")
    if not torch.cuda.is_available():
        sys.exit("bench_e2e.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    import polykern
    if not polykern.cuda_available():
        sys.exit("bench_e2e.py needs polykern's CUDA extension built for this GPU "
                 "(polykern.cuda_available() is False)")


def llama_config(layers: int, vocab: int):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                       num_key_value_heads=8, num_hidden_layers=layers, vocab_size=vocab,
                       max_position_embeddings=4096, rms_norm_eps=1e-5,
                       attn_implementation="sdpa", use_cache=False)


def build_model(impl: str, config):
    """The model for ``impl`` on the GPU in bf16, frozen except the adapters."""
    import torch
    from transformers import LlamaForCausalLM
    import polykern
    from polykern import PeraLinear, reference

    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    model.requires_grad_(False)
    if impl == "frozen":
        model.enable_input_require_grads()  # the backward still runs through every layer
    elif impl.startswith("peft_lora"):
        from peft import LoraConfig, get_peft_model
        cfg = LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=TARGETS)
        model = get_peft_model(model, cfg, autocast_adapter_dtype=(impl == "peft_lora_fp32"))
    elif impl == "peft_bridge_pera":
        from peft import LoraConfig, get_peft_model
        import polykern.peft
        cfg = LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=TARGETS)
        polykern.peft.register(cfg, method="pera", terms="full")
        model = get_peft_model(model, cfg, autocast_adapter_dtype=False)
    else:
        method, opts = {
            "polykern_lora": ("lora", {}),
            "polykern_pera_full": ("pera", {"terms": "full"}),
            "polykern_pera_square": ("pera", {"terms": "square"}),
            "polykern_genlora": ("genlora", {"num_rbf": 32}),
            "authors_pera": ("pera", {"terms": "full"}),
            "reference_pera": ("pera", {"terms": "full"}),
        }[impl]
        polykern.inject_adapters(model, TARGETS, method=method, r=RANK, **opts)
        if impl in ("authors_pera", "reference_pera"):
            fn = reference.pera_linear_authors if impl == "authors_pera" else reference.pera_linear

            class Baseline(PeraLinear):  # the same parameters, another formulation of the math
                def _adapted(self, x, W, bias, x_adapter):
                    return fn(x, W, bias, self.lora_A, self.lora_B, self.pera_h, self.scaling,
                              self.terms, x_adapter)
            for m in model.modules():
                if isinstance(m, PeraLinear):
                    m.__class__ = Baseline
    return model


def lengths_for(workload: str, steps: int, seed: int = 0):
    """(batch, [sequence length per step])."""
    batch = int(workload.removeprefix("varlen").split("x")[0])
    if workload.startswith("varlen"):
        lo, hi = (int(v) for v in workload.split("x")[1].split("-"))
        rng = random.Random(seed)
        return batch, [rng.randint(lo, hi) for _ in range(steps)]
    return batch, [int(workload.split("x")[1])] * steps


def run_workload(models, variants, workload, ckpt, config, warmup, steps):
    """Rows for one (workload, checkpointing): the variants' steps interleaved, one step of each
    in turn (the order rotating from step to step), so that drift of the GPU's clocks and of the
    host over the run falls on every variant alike. A variant is (impl, {option: value}): a
    polykern model run under some of its CUDA options (csrc/config.cpp).

    Memory: each step's peak allocated memory above what was allocated just before it (every
    model's weights, adapters and optimizer state; the previous step's gradients are freed), the
    largest over the timed steps."""
    import torch
    from polykern import ops
    for model in models.values():
        if ckpt:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        model.train()
    opts = {}
    for impl, model in models.items():
        trainable = [p for p in model.parameters() if p.requires_grad]
        opts[impl] = torch.optim.AdamW(trainable, lr=1e-3, fused=True) if trainable else None
    batch, lens = lengths_for(workload, warmup + steps)
    gen = torch.Generator("cuda").manual_seed(1)
    pool = torch.randint(0, config.vocab_size, (batch, max(lens)), device="cuda", generator=gen)
    times = {k: [] for k in range(len(variants))}
    losses = {k: [] for k in range(len(variants))}
    peaks = {k: 0 for k in range(len(variants))}
    for i, length in enumerate(lens):
        ids = pool[:, :length]
        order = list(range(len(variants)))
        order = order[i % len(order):] + order[:i % len(order)]
        for k in order:
            impl, setting = variants[k]
            model, opt = models[impl], opts[impl]
            with contextlib.ExitStack() as stack:
                for name, value in setting.items():
                    stack.enter_context(ops._option_set(name, value))
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                if opt is not None:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                elapsed = time.perf_counter() - t0
            if i >= warmup:
                times[k].append(elapsed)
                losses[k].append(float(loss.detach()))
                peaks[k] = max(peaks[k], torch.cuda.max_memory_allocated() - base)
            del loss
    rows = []
    tokens = batch * sum(lens[warmup:])
    for k, (impl, setting) in enumerate(variants):
        rows.append({"impl": impl, "options": setting, "workload": workload,
                     "checkpointing": ckpt,
                     "step_ms": round(1e3 * statistics.median(times[k]), 2),
                     "tokens_per_s": round(tokens / sum(times[k])),
                     "peak_mib_above_weights": round(peaks[k] / 2**20),
                     "loss_first": round(losses[k][0], 4),
                     "loss_last": round(losses[k][-1], 4), "steps": steps})
    del opts, pool
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def warm_shapes(config, workloads, ckpts, warmup, steps):
    """One untimed step of the frozen model at every (batch, length) the workloads will use, so
    that the first implementation timed does not pay alone for what the GPU libraries set up on
    a shape's first call (the base GEMMs' heuristics, attention kernels); adapter GEMMs are not
    warmed here."""
    import torch
    model = build_model("frozen", config)
    for workload in workloads:
        batch, lens = lengths_for(workload, warmup + steps)
        for ckpt in ckpts:
            if ckpt:
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_disable()
            for length in sorted(set(lens)):
                ids = torch.randint(0, config.vocab_size, (batch, length), device="cuda")
                model(input_ids=ids, labels=ids).loss.backward()
    del model
    gc.collect()
    torch.cuda.empty_cache()


def profile_step(model, workload, ckpt, config, out=sys.stdout, rows=30):
    """torch.profiler over two steps of `model` at `workload` (after two untimed ones): the
    kernels and ops that take the most GPU and host time, to see where a step goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3, fused=True) if trainable else None
    batch, lens = lengths_for(workload, 4)

    def step(length):
        ids = torch.randint(0, config.vocab_size, (batch, length), device="cuda")
        model(input_ids=ids, labels=ids).loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    for length in lens[:2]:
        step(length)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for length in lens[2:]:
            step(length)
        torch.cuda.synchronize()
    for key in ("cuda_time_total", "self_cpu_time_total"):
        print(prof.key_averages().table(sort_by=key, row_limit=rows), file=out)


def new_n_rows(count=50, n=4096, m=4096):
    """A training step of one layer at `count` token counts never seen before (first calls),
    against the frozen nn.Linear doing the same: total seconds and the ratio."""
    import torch
    import torch.nn as nn
    import polykern
    rows = []
    torch.manual_seed(0)
    base = nn.Linear(n, m, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    layers = {"frozen": base,
              "polykern_lora": polykern.PeraLinear.from_linear(base, r=RANK, terms="none"),
              "polykern_pera_full": polykern.PeraLinear.from_linear(base, r=RANK, terms="full"),
              "polykern_genlora": polykern.GenLoraLinear.from_linear(base, r=RANK, num_rbf=32)}
    # each implementation sees its own token counts, none seen before in the process
    counts = random.Random(3).sample(range(1024, 8192), len(layers) * count)
    x_all = torch.randn(max(counts), n, device="cuda", dtype=torch.bfloat16)
    for k, (name, layer) in enumerate(layers.items()):
        mine = counts[k::len(layers)]
        total = 0.0
        for N in mine:
            x = x_all[:N].clone().requires_grad_()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            layer(x).sum().backward()
            torch.cuda.synchronize()
            total += time.perf_counter() - t0
        rows.append({"impl": name, "workload": f"layer{n}x{m}_new_N_x{count}",
                     "checkpointing": False, "total_ms": round(1e3 * total, 2),
                     "ms_per_new_N": round(1e3 * total / count, 3)})
    frozen = rows[0]["total_ms"]
    for r in rows:
        r["ratio_to_frozen"] = round(r["total_ms"] / frozen, 3)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--checkpointing", default="off,on", help="off, on, or off,on")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--new-n", action="store_true", help="add the per-layer new-N rows")
    p.add_argument("--ab", default="",
                   help="comma-separated NAME=VALUE[@IMPL] settings of polykern's CUDA options "
                        "(csrc/config.cpp): each polykern implementation (or IMPL alone) also "
                        "runs under each one without checkpointing, interleaved with the rest: "
                        "the A/B rows that justify a default")
    p.add_argument("--profile", default="",
                   help="IMPL: also print torch.profiler tables of two steps of IMPL at each "
                        "workload (checkpointing as the first --checkpointing value)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    need_gpu()
    import torch
    impls = [i for i in args.impls.split(",") if i]
    workloads = [w for w in args.workloads.split(",") if w]
    bad = [i for i in impls if i not in IMPLS] + [w for w in workloads if w not in WORKLOADS]
    if bad:
        sys.exit(f"unknown implementations or workloads: {bad}; known: {IMPLS}, {WORKLOADS}")
    ckpts = [{"off": False, "on": True}[c] for c in args.checkpointing.split(",")]
    config = llama_config(args.layers, args.vocab)
    rows = []
    warm_shapes(config, workloads, ckpts, args.warmup, args.steps)
    models = {impl: build_model(impl, config) for impl in impls}
    plain = [(impl, {}) for impl in impls]
    ab = []
    for item in (item for item in args.ab.split(",") if item):
        setting, _, only = item.partition("@")
        name, value = setting.split("=")
        ab += [(impl, {name: int(value)}) for impl in impls
               if impl.startswith("polykern") and only in ("", impl)]
    for workload in workloads:
        for ckpt in ckpts:
            variants = plain if ckpt else plain + ab  # A/B rows without checkpointing only
            for row in run_workload(models, variants, workload, ckpt, config, args.warmup,
                                    args.steps):
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.profile:
        if args.profile not in models:
            sys.exit(f"--profile {args.profile}: not among --impls")
        for workload in workloads:
            print(f"#### profile: {args.profile}, {workload}, checkpointing {ckpts[0]}")
            profile_step(models[args.profile], workload, ckpts[0], config)
    del models
    gc.collect()
    torch.cuda.empty_cache()
    if args.new_n:
        for row in new_n_rows():
            rows.append(row)
            print(json.dumps(row), flush=True)
    model = {"shape": "Llama-3-8B", "hidden": 4096, "intermediate": 14336, "heads": 32,
             "kv_heads": 8, "layers": args.layers, "vocab": args.vocab, "dtype": "bfloat16",
             "attention": "sdpa", "adapters": TARGETS, "r": RANK, "genlora_num_rbf": 32,
             "optimizer": "AdamW(fused, lr=1e-3)", "warmup": args.warmup, "steps": args.steps,
             "step_ms": "median over the timed steps, implementations interleaved step by step",
             "peak_mib_above_weights": "a step's peak allocated memory above what lives between "
                                       "steps (weights, adapters, optimizer state), the largest "
                                       "over the timed steps"}
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": datetime.date.today().isoformat(), "model": model, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print_table(rows)
    return 0


def print_table(rows):
    def tag(r):
        return ",".join(f"{k}={v}" for k, v in r.get("options", {}).items())
    by = {(r["workload"], r["checkpointing"], r["impl"], tag(r)): r for r in rows
          if "step_ms" in r}
    for (w, c, impl, t), r in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        peft = by.get((w, c, "peft_lora_bf16", ""))
        frozen = by.get((w, c, "frozen", ""))
        vs = ""
        if peft:
            vs += (f"  time/peft {r['step_ms'] / peft['step_ms']:.3f}"
                   f"  mem/peft {r['peak_mib_above_weights'] / max(peft['peak_mib_above_weights'], 1):.3f}")
        if frozen:
            vs += f"  time/frozen {r['step_ms'] / frozen['step_ms']:.3f}"
        name = impl + (f"[{t}]" if t else "")
        print(f"{w:18s} ckpt={int(c)} {name:36s} {r['step_ms']:8.1f} ms "
              f"{r['peak_mib_above_weights']:7d} MiB{vs}")
    for r in rows:
        if "total_ms" in r:
            print(f"{r['workload']} {r['impl']:20s} {r['ms_per_new_N']:.2f} ms/new N "
                  f"({r['ratio_to_frozen']:.2f}x frozen)")


if __name__ == "__main__":
    sys.exit(main())
