"""``python -m polykern selftest``: the installed package checked on this machine's GPU (or, with
none, its reference path on the CPU), for users' CI on their own GPU, driver, CUDA and torch.

Checks, each printed on one line, then a summary; the exit status is 1 if any check failed:
- ``layer``: every layer configuration below, in each dtype, on odd shapes (in 259, out 131) as a
  2-D, a strided and a 3-D input (5 x 83 rows: the merged path of the default merge policy),
  forward and every gradient against the reference (``polykern.testing.check_layer``: the error
  against float64 at most 2x the same-dtype reference's);
- ``gradcheck``: float64 ``torch.autograd.gradcheck`` through the layer's path (the CUDA ops on a
  GPU), with and without dropout;
- ``opcheck``: ``torch.library.opcheck`` of the forward ops (GPU only: the ops have no CPU
  kernels);
- ``train``: a few Adam steps per method and weight dtype (fp32 adapter parameters, as adapters
  train): finite gradients, every adapter parameter moves, the loss falls.
``--json PATH`` writes every result with the GPU, driver, CUDA, torch and polykern versions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import ops
from .modules import GenLoraLinear, PeraLinear
from .testing import check_layer, gradcheck_layer, opcheck_layer, randomize_adapter_, strided

IN, OUT = 259, 131  # odd sizes: no kernel's tile divides them
LAYOUTS = {"2d": (37,), "strided": (37,), "3d": (5, 83)}
# (method, config, r); quick: one of each PERA terms family and GenLoRA
CASES = ([("pera", {"terms": "full"}, r) for r in (1, 4, 9)]
         + [("pera", {"terms": "square"}, 16), ("pera", {"terms": "cross"}, 5),
            ("pera", {"terms": "none"}, 5), ("pera", {"terms": "full"}, 32),
            ("genlora", {"num_rbf": 7, "latent_dim": 1}, 5),
            ("genlora", {"num_rbf": 32, "latent_dim": 3}, 16),
            ("genlora", {"num_rbf": 256, "latent_dim": 8}, 128)])
QUICK_CASES = [CASES[1], CASES[3], CASES[4], CASES[8]]
GRADCHECK_CASES = [("pera", {"terms": "full"}), ("pera", {"terms": "cross"}),
                   ("genlora", {"num_rbf": 5, "latent_dim": 2})]
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
               "float64": torch.float64, "fp64": torch.float64}
DEFAULT_DTYPES = ["float32", "bfloat16", "float16", "bfloat16/float32"]


def parse_dtype(spec: str) -> Tuple[torch.dtype, torch.dtype]:
    """``"bfloat16"`` -> (bf16, bf16); ``"bfloat16/float32"``: bf16 weight and activations with
    fp32 adapter parameters (mixed-precision training)."""
    parts = spec.split("/")
    if len(parts) > 2 or any(p not in DTYPE_NAMES for p in parts):
        raise argparse.ArgumentTypeError(
            f"unknown dtype {spec!r}: expected one of {sorted(DTYPE_NAMES)}, or weight/adapter "
            "such as bfloat16/float32")
    return DTYPE_NAMES[parts[0]], DTYPE_NAMES[parts[-1]]


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_label(dt: Tuple[torch.dtype, torch.dtype]) -> str:
    return _short(dt[0]) if dt[0] == dt[1] else f"{_short(dt[0])}/{_short(dt[1])}"


def make_layer(method: str, cfg: dict, r: int, n: int, m: int, device, dtypes, seed: int,
               dropout: float = 0.0):
    """A layer with random adapter values (in float64 on the CPU, then cast: the same values on
    every device)."""
    cls = PeraLinear if method == "pera" else GenLoraLinear
    with torch.random.fork_rng(devices=[]):  # the frozen weight's init; the caller's RNG untouched
        torch.manual_seed(seed)
        layer = cls(n, m, bias=True, r=r, dropout=dropout, dtype=torch.float64, **cfg)
    randomize_adapter_(layer, seed)
    adapter = set(layer.adapter_parameter_names)
    for name, p in layer.named_parameters():
        p.data = p.data.to(device, dtypes[1] if name in adapter else dtypes[0])
    return layer


def _randn(shape, device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)


def environment(device: torch.device) -> dict:
    """Versions and the machine, for the report and the JSON."""
    from . import __version__
    env = {"polykern": __version__, "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "device": str(device),
           "extension_loaded": ops.extension_loaded(), "cuda_ops": ops.cuda_available(),
           "poison": os.environ.get("POLYKERN_POISON"), "gpu": None, "capability": None,
           "driver": None}
    if ops._LOAD_ERROR is not None:
        env["extension_error"] = repr(ops._LOAD_ERROR)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["capability"] = f"sm_{props.major}{props.minor}"
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["driver"] = _driver_version(device)
    return env


def _driver_version(device: torch.device) -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader",
                              "-i", str(device.index or 0)], capture_output=True, text=True,
                             timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return None


class Runner:
    """Runs named checks, prints one line each, keeps the results for the summary and JSON."""

    def __init__(self):
        self.results: List[dict] = []

    def run(self, kind: str, name: str, fn: Callable[[], Optional[str]]) -> None:
        t0 = time.perf_counter()
        try:
            detail = fn() or ""
            status = "PASS"
            if detail.startswith("SKIP"):
                status, detail = "SKIP", detail[4:].lstrip(": ")
        except Exception as e:  # noqa: BLE001  (a failing check is a result, not a crash)
            status, detail = "FAIL", f"{type(e).__name__}: {e}".strip()
        seconds = time.perf_counter() - t0
        self.results.append({"kind": kind, "name": name, "status": status, "detail": detail,
                             "seconds": round(seconds, 3)})
        first = detail.splitlines()[0] if detail else ""
        print(f"{status} {kind:9s} {name}: {first} ({seconds:.2f} s)", flush=True)
        for line in detail.splitlines()[1:] if status == "FAIL" else ():
            print(f"    {line}")

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.results)


def _layer_check(method, cfg, r, dtypes, layout, device, seed):
    def fn():
        layer = make_layer(method, cfg, r, IN, OUT, device, dtypes, seed)
        x = _randn((*LAYOUTS[layout], IN), device, dtypes[0], seed + 1)
        if layout == "strided":
            x = strided(x)
        return check_layer(layer, x, randomize=False, seed=seed).assert_passed().summary()
    return fn


def _gradcheck(method, cfg, dropout, device, seed):
    def fn():
        layer = make_layer(method, cfg, 3, 6, 5, device, (torch.float64, torch.float64), seed,
                           dropout)
        gradcheck_layer(layer, randomize=False, seed=seed)
        return "float64 gradients match finite differences (input and every adapter parameter)"
    return fn


def _opcheck(method, cfg, device, seed, quick):
    def fn():
        if device.type != "cuda" or not ops.cuda_available():
            return "SKIP: the CUDA ops are not in use here (no GPU or no extension)"
        layer = make_layer(method, cfg, 4, 37, 53, device, (torch.float64, torch.float64), seed)
        x = _randn((2, 5, 37), device, torch.float64, seed + 1)
        opcheck_layer(layer, x, all_variants=not quick)
        return "schema, fake tensor, autograd registration and AOT dispatch agree"
    return fn


def _train(method, cfg, dtypes, device, seed, steps=5):
    def fn():
        layer = make_layer(method, cfg, 8, IN, OUT, device, dtypes, seed).train()
        x = _randn((5, 83, IN), device, dtypes[0], seed + 1)
        with torch.no_grad():  # a target the adapter can move toward: a random low-rank shift
            target = layer(x) + 0.3 * F.linear(
                F.linear(x, _randn((4, IN), device, dtypes[0], seed + 2)),
                _randn((OUT, 4), device, dtypes[0], seed + 3) / 4)
        params = layer.adapter_parameters()
        before = [p.detach().clone() for p in params]
        opt = torch.optim.Adam(params, lr=1e-3)
        losses = []
        for step in range(steps):
            loss = (layer(x).float() - target.float()).square().mean()
            opt.zero_grad()
            loss.backward()
            for name, p in zip(layer.adapter_parameter_names, params):
                if p.grad is None or not torch.isfinite(p.grad).all():
                    raise AssertionError(f"step {step}: {name}'s gradient is missing or "
                                         "not finite")
            opt.step()
            losses.append(loss.item())
        still = [n for n, p, b in zip(layer.adapter_parameter_names, params, before)
                 if torch.equal(p.detach(), b)]
        if still:
            raise AssertionError(f"adapter parameters that did not move: {still}")
        if not (all(map(math.isfinite, losses)) and losses[-1] < losses[0]):
            raise AssertionError(f"the loss did not fall: {losses}")
        return f"loss {losses[0]:.4g} -> {losses[-1]:.4g} in {steps} Adam steps"
    return fn


def _cfg_name(method, cfg, r):
    return f"{method} " + " ".join(f"{k}={v}" for k, v in cfg.items()) + f" r={r}"


def run_checks(device: torch.device, dtypes, quick: bool, runner: Runner) -> None:
    if device.type == "cuda":
        runner.run("extension", "CUDA ops loaded",
                   lambda: "polykern's CUDA ops serve CUDA inputs" if ops.cuda_available()
                   else _raise(RuntimeError(
                       "the CUDA ops are not loaded, so only the reference path is checked "
                       f"on this GPU (extension import: {ops._LOAD_ERROR!r})")))
    seed = 0
    for method, cfg, r in QUICK_CASES if quick else CASES:
        for dt in dtypes:
            for layout in LAYOUTS:
                seed += 10
                shape = "x".join(map(str, (*LAYOUTS[layout], IN)))
                runner.run("layer", f"{_cfg_name(method, cfg, r)} {_dtype_label(dt)} {layout} "
                           f"{shape}->{OUT}", _layer_check(method, cfg, r, dt, layout, device,
                                                           seed))
    for method, cfg in GRADCHECK_CASES[1:] if quick else GRADCHECK_CASES:
        for dropout in (0.3,) if quick else (0.0, 0.3):
            seed += 10
            runner.run("gradcheck", f"{_cfg_name(method, cfg, 3)} dropout={dropout} 2x3x6->5",
                       _gradcheck(method, cfg, dropout, device, seed))
    for method, cfg in (GRADCHECK_CASES[0], GRADCHECK_CASES[2]):
        seed += 10
        runner.run("opcheck", f"{_cfg_name(method, cfg, 4)} float64 2x5x37->53",
                   _opcheck(method, cfg, device, seed, quick))
    # adapters train in fp32 beside a low-precision weight (Adam's updates of a bf16 parameter
    # round away; fp16 moments underflow): one step set per weight dtype
    weight_dtypes = list(dict.fromkeys(dt[0] for dt in dtypes))
    for method, cfg in (GRADCHECK_CASES[0], GRADCHECK_CASES[2]):
        for w in weight_dtypes:
            dt = (w, torch.float64 if w == torch.float64 else torch.float32)
            seed += 10
            runner.run("train", f"{_cfg_name(method, cfg, 8)} {_dtype_label(dt)} 5x83x{IN}"
                       f"->{OUT}", _train(method, cfg, dt, device, seed))


def _raise(e: Exception):
    raise e


def _pick_device(spec: str) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("polykern selftest: --device cuda, but torch finds no GPU "
                         "(torch.cuda.is_available() is False)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m polykern selftest [--quick] [--dtypes ...] [--json PATH] [--device ...]``:
    returns the exit status (0: every check passed; 1: a check failed; 2: no such device)."""
    p = argparse.ArgumentParser(prog="python -m polykern selftest", description=(
        "Check the installed polykern on this machine: every CUDA op against the reference "
        "(forward and every gradient, each dtype, odd, strided and 3-D shapes), float64 "
        "gradcheck, opcheck and a short training step per method. Without a GPU, the reference "
        "path on the CPU. Exit status 1 on any failure."))
    p.add_argument("--quick", action="store_true",
                   help="fewer configurations (under a minute on an H100)")
    p.add_argument("--dtypes", nargs="+", type=parse_dtype, metavar="DTYPE",
                   default=[parse_dtype(d) for d in DEFAULT_DTYPES],
                   help="activation/weight dtypes, or weight/adapter pairs (default: "
                        + " ".join(DEFAULT_DTYPES) + ")")
    p.add_argument("--json", metavar="PATH", help="write the results and versions here")
    p.add_argument("--device", default="auto",
                   help="cuda, cuda:N or cpu (default: the GPU if torch finds one, else the CPU)")
    args = p.parse_args(argv)
    # Every polykern kernel output is filled with NaN before the kernel writes it, so that an
    # element never written shows as non-finite. The extension reads this once, at the first
    # kernel call of the process: on for the command; in a process that already ran kernels,
    # as that process set it.
    os.environ.setdefault("POLYKERN_POISON", "1")
    try:
        device = _pick_device(args.device)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.cuda.set_device(device)

    env = environment(device)
    print(f"polykern {env['polykern']} selftest | torch {env['torch']} (CUDA {env['cuda']}) | "
          f"python {env['python']}")
    if device.type == "cuda":
        path = "the CUDA ops" if env["cuda_ops"] else "the reference (CUDA ops NOT loaded)"
        print(f"device {device}: {env['gpu']} ({env['capability']}, "
              f"{env['gpu_memory_gib']} GiB), driver {env['driver'] or 'unknown'}; checking {path} "
              "against the reference")
    else:
        why = ("no GPU found (torch.cuda.is_available() is False)"
               if not torch.cuda.is_available() else "--device cpu")
        print(f"device cpu: {why}. Checking the reference path on the CPU: the modules against "
              "the reference functions, float64 gradcheck and training steps; the CUDA ops are "
              "NOT checked (run this on a GPU for that).")
    env["path"] = "cuda-ops" if device.type == "cuda" and env["cuda_ops"] else "reference"
    env["quick"] = args.quick
    env["dtypes"] = [_dtype_label(d) for d in args.dtypes]

    runner = Runner()
    t0 = time.perf_counter()
    run_checks(device, args.dtypes, args.quick, runner)
    seconds = time.perf_counter() - t0
    passed, failed, skipped = (runner.count(s) for s in ("PASS", "FAIL", "SKIP"))
    print(f"{'FAILED' if failed else 'OK'}: {passed} passed, {failed} failed, {skipped} skipped "
          f"in {seconds:.1f} s on {env['gpu'] or 'the CPU'} ({env['path']} path)")
    if args.json:
        report = {"environment": env, "summary": {"passed": passed, "failed": failed,
                                                  "skipped": skipped,
                                                  "seconds": round(seconds, 1)},
                  "checks": runner.results}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
