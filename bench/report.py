"""Turn bench/results/ into the README's tables and the per-layer plot.

    python bench/report.py                     # print the tables
    python bench/report.py --readme README.md  # rewrite the README's generated blocks
    python bench/report.py --plot bench/results/layers_h100.png

Inputs (each optional; a missing one leaves a note in its block):
  e2e     bench/results/e2e_h100.json     bench/bench_e2e.py: whole training steps
  layers  bench/results/layers_h100.json  pytest bench/ --benchmark-only --benchmark-json=...
  multi   bench/results/h200x2.json       bench/h200x2_run.sh: DDP / FSDP2 on 2 GPUs
The README's blocks sit between `<!-- report:NAME -->` and `<!-- /report:NAME -->` lines; the
script replaces what is between them and nothing else. Runs anywhere (no GPU, no polykern).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def _load(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _source(path, env):
    rel = os.path.relpath(path, os.path.dirname(HERE))
    parts = [env.get("gpu"), env.get("torch") and f"torch {env['torch']}", env.get("date")]
    parts = [p for p in parts if p]
    return f"Source: `{rel}` ({', '.join(str(p) for p in parts)})."


def _table(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _x(v):
    return f"{v:.2f}x" if isinstance(v, (int, float)) else ""


# ---- end to end -------------------------------------------------------------------------------
E2E_COLUMNS = [("frozen", "frozen"), ("peft_lora_bf16", "peft LoRA (bf16)"),
               ("polykern_lora", "polykern LoRA"), ("polykern_pera_full", "PERA full"),
               ("polykern_pera_square", "PERA square"), ("polykern_genlora", "GenLoRA"),
               ("authors_pera", "PERA, authors' code")]


def _plain_rows(rows):
    """The rows of whole steps in the default configuration (no A/B option, no new-N row)."""
    return [r for r in rows if "step_ms" in r and not r.get("options")]


def e2e_block(path):
    data = _load(path)
    if data is None:
        return (f"No end-to-end results yet: `bench/bench_e2e.py` writes "
                f"`{os.path.relpath(path, os.path.dirname(HERE))}`.")
    rows = data["rows"] if isinstance(data, dict) else data
    env = data if isinstance(data, dict) else {}
    plain = _plain_rows(rows)
    cases = list(dict.fromkeys((r["workload"], r["checkpointing"]) for r in plain))
    by = {(r["workload"], r["checkpointing"], r["impl"]): r for r in plain}
    cols = [(k, name) for k, name in E2E_COLUMNS if any(i == k for _, _, i in by)
            and k not in ("frozen", "peft_lora_bf16")]
    head = ["workload", "ckpt", "frozen: ms", "peft LoRA: ms, GiB"] + [name for _, name in cols]
    body = []
    for w, c in cases:
        peft, frozen = by.get((w, c, "peft_lora_bf16")), by.get((w, c, "frozen"))
        cells = [f"{frozen['step_ms']:.1f}" if frozen else "",
                 f"{peft['step_ms']:.1f}, {peft['peak_mib_above_weights'] / 1024:.2f}"
                 if peft else ""]
        for k, _ in cols:
            r = by.get((w, c, k))
            cells.append("" if r is None or peft is None else
                         f"{r['step_ms'] / peft['step_ms']:.2f}x / "
                         f"{r['peak_mib_above_weights'] / peft['peak_mib_above_weights']:.2f}x")
        body.append([w, "on" if c else "off"] + cells)
    tables = [_table(head, body)]
    new_n = [r for r in rows if "ms_per_new_N" in r]
    extra = ""
    if new_n:
        extra = ("\n\nA new token count each step (" + new_n[0]["workload"] + ", ms per step): "
                 + ", ".join(f"{r['impl']} {r['ms_per_new_N']:.2f}" for r in new_n) + ".")
    memory = env.get("model", {}).get("peak_mib_above_weights",
                                      "peak allocated memory above the weights")
    note = (f"Adapter columns: step time / peak memory ({memory}), each as a ratio to peft's "
            "LoRA r=16 with bf16 adapters.")
    return "\n\n".join(tables) + "\n\n" + note + extra + "\n\n" + _source(path, env)


def e2e_summary(path):
    """One sentence for the README's opening: PERA full and GenLoRA against peft's LoRA on the
    first workload without checkpointing."""
    data = _load(path)
    if data is None:
        return ("End-to-end numbers (a whole fine-tuning step of a Llama-3-8B-shaped model) "
                "come from `bench/bench_e2e.py`; none are recorded yet.")
    rows = _plain_rows(data["rows"] if isinstance(data, dict) else data)
    env = data if isinstance(data, dict) else {}
    first = rows[0]["workload"]
    by = {r["impl"]: r for r in rows if r["workload"] == first and not r["checkpointing"]}
    peft = by["peft_lora_bf16"]
    parts = [f"{name} r=16 takes {by[k]['step_ms'] / peft['step_ms']:.2f}x the time of peft's "
             f"LoRA r=16 with {by[k]['peak_mib_above_weights'] / peft['peak_mib_above_weights']:.2f}x "
             "its peak memory" for k, name in (("polykern_pera_full", "PERA full"),
                                               ("polykern_genlora", "GenLoRA")) if k in by]
    model = env.get("model", {})
    return (f"A fine-tuning step of a Llama-3-8B-shaped model ({model.get('layers', '?')} layers, "
            f"{first} tokens, {env.get('gpu', 'GPU')}): " + "; ".join(parts) + ".")


# ---- per layer --------------------------------------------------------------------------------
def layer_rows(data):
    """(rows, env): one dict per (case, mode, impl) with the ratios, whatever the file's format."""
    if "benchmarks" in data:  # pytest-benchmark JSON (bench/test_bench_layers.py)
        rows = []
        for b in data["benchmarks"]:
            r = dict(b["extra_info"])
            r["ms_benchmark"] = b["stats"]["median"] * 1e3
            rows.append(r)
        return rows, data.get("machine_info", {})
    # LEGACY: bench_layers.py's {"gpu", "torch", "date", "rows"}, the format of the committed
    # layers_h100.json until the first run of test_bench_layers.py replaces it; delete this
    # branch then.
    by_key = {}
    for x in data["rows"]:  # its memory rows lack GenLoRA's K: keyed without it
        key = (x["op"], x.get("terms"), x["r"], x["N"], x["in"], x["out"], x["mode"], x["impl"],
               bool(x.get("sweep")))
        r = by_key.setdefault(key, dict(zip(("op", "terms", "r", "N", "n", "m", "mode", "impl",
                                             "sweep"), key), K=None))
        if x.get("K") is not None:
            r["K"] = x["K"]
        if x.get("metric") == "peak_extra_MiB":
            r["peak_extra_MiB"] = x["value"]
        elif x.get("variant") == "graph":
            r["ratio_graph"] = x["ratio"]
        elif "ms" in x and not x.get("variant"):
            r.update(ms=x["ms"], ratio=x["ratio"], ratio_stream=x["ratio_stream"])
    return list(by_key.values()), data


def case_label(r):
    if r["op"] == "pera":
        s = f"PERA {r['terms']} r={r['r']}"
    else:
        s = f"GenLoRA r={r['r']} K={r['K']}"
    s += f", N={r['N']}"
    if (r["n"], r["m"]) != (4096, 4096):
        s += f", {r['n']}x{r['m']}"
    return s + (", forward only" if r["mode"] == "fwd" else "")


def layers_block(path):
    data = _load(path)
    if data is None:
        return "No per-layer results yet: `pytest bench/ --benchmark-only --benchmark-json=...`."
    rows, env = layer_rows(data)
    main = [r for r in rows if not r.get("sweep")]
    cases = []
    for r in main:
        c = tuple(r[k] for k in ("op", "terms", "r", "K", "N", "n", "m", "mode"))
        if c not in cases:
            cases.append(c)

    def get(c, impl, key):
        r = next((r for r in main if r["impl"] == impl
                  and tuple(r[k] for k in ("op", "terms", "r", "K", "N", "n", "m", "mode")) == c),
                 None)
        return r.get(key) if r else None

    body = []
    for c in cases:
        label = case_label(dict(zip(("op", "terms", "r", "K", "N", "n", "m", "mode"), c)))
        mem = " / ".join(f"{v:.0f}" if v is not None else "-" for v in
                         (get(c, i, "peak_extra_MiB") for i in ("polykern", "naive",
                                                                  "frozen_linear")))
        mem = "" if mem == "- / - / -" else mem
        body.append([label,
                     " / ".join(_x(get(c, "polykern", k))
                                for k in ("ratio", "ratio_stream", "ratio_graph")),
                     _x(get(c, "naive", "ratio_stream")),
                     _x(get(c, "compiled_naive", "ratio_stream")),
                     _x(get(c, "authors", "ratio_stream")),
                     _x(get(c, "lora_eager", "ratio_stream")),
                     _x(get(c, "peft_lora", "ratio_stream")),
                     _x(get(c, "merged", "ratio_stream")), mem])
    head = ["case", "polykern: one step / 10 back to back / captured", "naive PyTorch",
            "torch.compile(naive)", "authors' code", "plain LoRA r=16", "peft LoRA",
            "merged layer", "step's peak MiB above steady state: polykern / naive / frozen"]
    keep = [j for j in range(len(head)) if j == 0 or any(str(row[j]).strip() for row in body)]
    head, body = [head[j] for j in keep], [[row[j] for j in keep] for row in body]  # no empty columns
    return _table(head, body) + "\n\n" + _source(path, env)


def plot(path, out):
    data = _load(path)
    if data is None:
        print(f"report.py: no {path}, no plot", file=sys.stderr)
        return
    try:
        import matplotlib
    except ImportError:
        print("report.py: the plot needs matplotlib", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, env = layer_rows(data)
    panels = [("ratio", "one synchronised step"), ("ratio_stream", "10 steps back to back"),
              ("ratio_graph", "step captured in a CUDA graph")]
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5), sharey=True)
    for ax, (key, title) in zip(axes, panels):
        for op, cfg, impl, style in (("pera", {"terms": "full", "r": 16}, "polykern", "o-"),
                                     ("pera", {"terms": "full", "r": 16}, "naive", "s--"),
                                     ("pera", {"terms": "full", "r": 16}, "lora_eager", "^:"),
                                     ("genlora", {"r": 16, "K": 32}, "polykern", "o-"),
                                     ("genlora", {"r": 16, "K": 32}, "naive", "s--")):
            pts = sorted((r["N"], r[key]) for r in rows
                         if r["op"] == op and r["impl"] == impl and r["mode"] == "fwd+bwd"
                         and (r["n"], r["m"]) == (4096, 4096) and r.get(key) is not None
                         and all(r.get(k) == v for k, v in cfg.items()))
            if pts:
                label = "plain LoRA r=16 (PyTorch)" if impl == "lora_eager" else f"{op} {impl}"
                ax.plot(*zip(*pts), style, label=label)
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("N (tokens)")
        ax.set_title(title)
    axes[0].set_ylabel("time / frozen nn.Linear (fwd+bwd)")
    axes[0].legend()
    fig.suptitle(f"4096x4096 bf16, PERA full r=16, GenLoRA r=16 K=32 ({env.get('gpu')}, "
                 f"torch {env.get('torch')}, {env.get('date')})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


# ---- multi-GPU --------------------------------------------------------------------------------
def multi_block(path):
    data = _load(path)
    if data is None:
        return "No multi-GPU results yet: `bash bench/h200x2_run.sh` on a 2-GPU machine."
    names = {"single": "single GPU", "single_accum": "single GPU, batch in 2 accumulated halves",
             "ddp": "DDP", "fsdp2": "FSDP2"}
    body = []
    for mode, r in data["modes"].items():
        body.append([names.get(mode, mode), r["world_size"],
                     f"{r['loss_first']:.4f} -> {r['loss_last']:.4f}",
                     f"{r['max_loss_diff_vs_single']:.3g}", f"{r['reload_rel_err']:.3g}",
                     f"{r['tokens_per_s_per_gpu']:,.0f} ({r['per_gpu_vs_single']:.2f}x)"])
    head = ["mode", "GPUs", f"loss, step 1 -> {data.get('steps')}",
            "max loss difference from one GPU", "adapters reloaded on one GPU: rel. error",
            "tokens/s per GPU (vs one GPU)"]
    env = dict(data, gpu=f"{data.get('gpus')} x {data.get('gpu')}")
    return _table(head, body) + "\n\n" + _source(path, env)


def rewrite(readme, blocks):
    with open(readme) as f:
        text = f.read()
    for name, body in blocks.items():
        pat = re.compile(rf"(<!-- report:{name} -->\n).*?(<!-- /report:{name} -->)", re.S)
        if not pat.search(text):  # this README does not show that table
            continue
        text = pat.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    with open(readme, "w") as f:
        f.write(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--e2e", default=os.path.join(RESULTS, "e2e_h100.json"))
    ap.add_argument("--layers", default=os.path.join(RESULTS, "layers_h100.json"))
    ap.add_argument("--multi", default=os.path.join(RESULTS, "h200x2.json"))
    ap.add_argument("--readme", help="rewrite this README's generated blocks")
    ap.add_argument("--plot", help="write the per-layer ratio-against-N plot (PNG) here")
    args = ap.parse_args(argv)
    blocks = {"summary": e2e_summary(args.e2e), "e2e": e2e_block(args.e2e), "layers": layers_block(args.layers),
              "multi": multi_block(args.multi)}
    if args.readme:
        rewrite(args.readme, blocks)
    else:
        for name, body in blocks.items():
            print(f"## {name}\n\n{body}\n")
    if args.plot:
        plot(args.layers, args.plot)


if __name__ == "__main__":
    main()
