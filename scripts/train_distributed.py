"""Data-parallel training of PERA and GenLoRA adapters with DDP or FSDP2 on polykern's engine.

The model is a small BERT (``transformers.BertModel``) with PERA in its attention (``query``,
``value``) and GenLoRA in its MLP (``intermediate.dense`` and the block's ``output.dense``),
built from a seed so every process and a single-process run start from the same weights. Each
step draws one global batch (``--global-batch`` rows, also from a seed); each of the N processes
trains on its 1/N slice, so the gradients, averaged over processes, are those of the global batch.

    # CPU, gloo (what tests/test_distributed.py runs)
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 scripts/train_distributed.py \\
        --modes ddp,fsdp2 --out /tmp/dist
    # GPUs, NCCL: one process per GPU
    torchrun --standalone --nproc-per-node 8 scripts/train_distributed.py --device cuda \\
        --modes ddp,fsdp2 --out /tmp/dist
    # the single-process reference on the same global batches
    python scripts/train_distributed.py --modes single --out /tmp/dist

The 2-GPU run of issue 7 (bf16, a BERT large enough for the kernels to matter, a single-GPU
run and a single-GPU run with the batch in two accumulated halves as references; then
``--report`` checks the losses and reloads the adapters):

    python scripts/train_distributed.py --device cuda --modes single,single_accum $BIG --out D
    torchrun --standalone --nproc-per-node 2 scripts/train_distributed.py --device cuda \
        --modes ddp,fsdp2 $BIG --out D
    python scripts/train_distributed.py --report --device cuda $BIG --out D --json h200x2.json
    # BIG="--dtype bfloat16 --hidden 1024 --layers 4 --heads 16 --inter 4096 --seq 128
    #      --vocab 1000 --pera-r 16 --genlora-r 16 --num-rbf 32 --global-batch 64 --steps 300
    #      --lr 1e-4 --timing-warmup 20"

For each mode the script writes ``<mode>_run.json`` (the global-batch loss of every step, the
world size, the type of the trained parameters) and
``<mode>_adapters.safetensors``: the adapters gathered to full tensors from the DDP replica or
the FSDP2 shards, written by rank 0 in ``polykern.save_adapters``'s format, so
``polykern.load_adapters`` loads them into a fresh single-process model.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

import polykern

# A BERT small enough for two CPU processes on two cores, big enough to have every layer kind.
BERT = dict(vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=80, max_position_embeddings=32, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)
SEQ_LEN = 12
# Which layers get which adapter; dropout 0 so N processes draw the same numbers as one.
ADAPTERS = (
    ("pera", ["query", "value"], dict(r=4, terms="full")),
    ("genlora", r"encoder\.layer\.\d+\.(intermediate|output)\.dense", dict(r=4, num_rbf=8)),
)


DTYPE = torch.float32
ACCUM = 2  # micro-batches of the single_accum reference


def configure(args) -> None:
    """Model size, adapter ranks and dtype from the command line (the defaults are the small
    CPU configuration above)."""
    global SEQ_LEN, DTYPE, ADAPTERS
    BERT.update(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                num_attention_heads=args.heads, intermediate_size=args.inter,
                max_position_embeddings=max(32, args.seq))
    SEQ_LEN = args.seq
    DTYPE = getattr(torch, args.dtype)
    ADAPTERS = (
        ("pera", ["query", "value"], dict(r=args.pera_r, terms="full")),
        ("genlora", r"encoder\.layer\.\d+\.(intermediate|output)\.dense",
         dict(r=args.genlora_r, num_rbf=args.num_rbf)),
    )


def build_model(seed: int = 0, adapters: bool = True, device="cpu") -> nn.Module:
    """The seeded BERT, with the ``ADAPTERS`` injected (or plain, to load adapters into), in
    ``DTYPE``."""
    import transformers
    torch.manual_seed(seed)
    model = transformers.BertModel(transformers.BertConfig(**BERT), add_pooling_layer=False)
    if adapters:
        for method, targets, cfg in ADAPTERS:
            polykern.inject_adapters(model, targets, method=method, **cfg)
    return model.to(device=device, dtype=DTYPE)


def global_batch(step: int, size: int, seed: int = 1234) -> Tuple[Tensor, Tensor]:
    """Step ``step``'s batch: ``ids (size, SEQ_LEN)`` and regression targets ``(size, hidden)``."""
    g = torch.Generator().manual_seed(seed + step)
    ids = torch.randint(0, BERT["vocab_size"], (size, SEQ_LEN), generator=g)
    target = torch.randn(size, BERT["hidden_size"], generator=g)
    return ids, target


def loss_fn(model: nn.Module, ids: Tensor, target: Tensor) -> Tensor:
    """Mean-pooled last hidden state regressed on ``target``: mean over the rows given."""
    hidden = model(input_ids=ids).last_hidden_state.float()   # (batch, seq, hidden)
    return (hidden.mean(1) - target).square().mean()


def eval_ids(rows: int = 4) -> Tensor:
    """A fixed batch (not a training one) whose outputs are compared after reloading."""
    return global_batch(10**6, rows)[0]


def _rank_world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def wrap(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """``single``: as is; ``ddp``: DistributedDataParallel; ``fsdp2``: ``fully_shard`` on each
    encoder layer, then on the root (FSDP2 shards every parameter, frozen ones included, and
    reduce-scatters the gradients of the trainable ones)."""
    if mode in ("single", "single_accum"):
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for layer in model.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ValueError(f"unknown mode {mode!r}: expected single, single_accum, ddp or fsdp2")


def gather_adapter_state(model: nn.Module, wrapped: nn.Module) -> Dict[str, Tensor]:
    """Full adapter tensors on CPU, keyed as ``polykern.adapter_state_dict(model)``; rank 0 gets
    them, the other ranks an empty dict. A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    keys = list(polykern.adapter_state_dict(model))
    if not (dist.is_available() and dist.is_initialized()):
        return {k: v.detach().cpu().clone() for k, v in polykern.adapter_state_dict(model).items()}
    # full_state_dict gathers FSDP2 shards (and strips DDP's "module." prefix); cpu_offload keeps
    # the gathered tensors on rank 0 only.
    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True,
                                                                  cpu_offload=True))
    return {k: full[k] for k in keys} if dist.get_rank() == 0 else {}


def train(mode: str, steps: int = 4, global_batch_size: int = 8, lr: float = 1e-2,
          device: str = "cpu", out: str = None, seed: int = 0,
          timing_warmup: int = 0) -> Tuple[List[float], nn.Module]:
    """Train ``steps`` AdamW steps in ``mode``; returns the global-batch losses and the (unwrapped)
    model. With ``out``, rank 0 writes ``<mode>_run.json`` (losses, tokens/s over the steps after
    ``timing_warmup``), ``<mode>_adapters.safetensors`` and ``<mode>_eval.pt`` (the trained
    model's output on ``eval_ids()``). ``single_accum`` is one process that sums the gradients
    of ``ACCUM`` slices of the global batch: the same math as ``single`` in another order.
    """
    rank, world = _rank_world()
    if mode in ("single", "single_accum"):
        rank, world = 0, 1
    if global_batch_size % world:
        raise ValueError(f"global batch {global_batch_size} does not split over {world} processes")
    dev = torch.device(device)
    model = build_model(seed, device=dev)
    wrapped = wrap(model, mode, dev)
    # Parameters are taken after wrapping: fully_shard swaps them for sharded DTensors.
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    # What the model trains: DTensor shards under FSDP2, plain tensors otherwise.
    param_type = type(params[0].data).__name__
    per_rank = global_batch_size // world
    micro = ACCUM if mode == "single_accum" else 1
    if per_rank % micro:
        raise ValueError(f"global batch {global_batch_size} does not split into {micro} slices")
    t_start = None
    for step in range(steps):
        if step == timing_warmup:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t_start = time.perf_counter()
        ids, target = global_batch(step, global_batch_size)
        ids = ids[rank * per_rank:(rank + 1) * per_rank].to(dev)
        target = target[rank * per_rank:(rank + 1) * per_rank].to(dev)
        logged = torch.zeros((), device=dev)
        for part in range(micro):  # mean over equal slices = the slices' losses / micro
            rows = slice(part * per_rank // micro, (part + 1) * per_rank // micro)
            loss = loss_fn(wrapped, ids[rows], target[rows]) / micro
            loss.backward()
            logged += loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if world > 1:   # each rank's loss is the mean over equal slices: average them
            dist.all_reduce(logged)
            logged = logged / world
        losses.append(float(logged))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    timed = steps - timing_warmup
    tokens_per_s = (timed * global_batch_size * SEQ_LEN / (time.perf_counter() - t_start)
                    if t_start is not None and timed > 0 else None)
    with torch.no_grad():  # every rank runs the same batch (FSDP2's forward is collective)
        eval_out = wrapped(input_ids=eval_ids().to(dev)).last_hidden_state.float().cpu()
    tensors = gather_adapter_state(model, wrapped)
    if out is not None and rank == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"{mode}_run.json"), "w") as f:
            json.dump({"losses": losses, "world_size": world, "param_type": param_type,
                       "device": str(dev), "dtype": str(DTYPE).replace("torch.", ""),
                       "timed_steps": timed, "tokens_per_s": tokens_per_s,
                       "tokens_per_s_per_gpu": None if tokens_per_s is None
                       else tokens_per_s / world}, f)
        polykern.save_adapters(model, os.path.join(out, f"{mode}_adapters.safetensors"),
                               state_dict=tensors)
        torch.save(eval_out, os.path.join(out, f"{mode}_eval.pt"))
    if world > 1:
        dist.barrier()
    return losses, model


def report(out: str, device: str, json_path: str = None) -> dict:
    """Checks of a finished set of runs in ``out`` (single process):
    - each mode's losses against the single-GPU run's. The bound is derived, not guessed: the
      single-GPU run with the batch in ACCUM accumulated slices is the same math in another
      order, and its largest distance from the single run is what reordering alone gives in
      this dtype; a data-parallel run may be at most 2x that (plus 4 fp32 ulps of the loss);
    - the adapters each run saved (gathered from replicas or shards) load into a fresh plain
      model on one device, which reproduces that run's output on ``eval_ids()`` (to the
      dtype's rounding: the same weights and kernels, another process);
    - tokens/s of each run, and per GPU against the single-GPU run."""
    runs = {m: json.load(open(os.path.join(out, f"{m}_run.json")))
            for m in ("single", "single_accum", "ddp", "fsdp2")
            if os.path.exists(os.path.join(out, f"{m}_run.json"))}
    ref = torch.tensor(runs["single"]["losses"], dtype=torch.float64)
    eps = torch.finfo(DTYPE).eps
    noise = (torch.tensor(runs["single_accum"]["losses"], dtype=torch.float64) - ref).abs().max()
    slack = 4 * torch.finfo(torch.float32).eps * ref.abs().max()  # the loss is fp32
    res = {"gpu": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
           "gpus": max(r["world_size"] for r in runs.values()), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "dtype": str(DTYPE).replace("torch.", ""),
           "model": dict(BERT, seq_len=SEQ_LEN),
           "adapters": [[m, t if isinstance(t, str) else list(t), c] for m, t, c in ADAPTERS],
           "steps": len(ref), "reorder_noise": float(noise), "modes": {}}
    single_tps = runs["single"]["tokens_per_s"]
    for mode, run in runs.items():
        losses = torch.tensor(run["losses"], dtype=torch.float64)
        dev_max = float((losses - ref).abs().max())
        fresh = build_model(adapters=False, device=device)
        polykern.load_adapters(fresh, os.path.join(out, f"{mode}_adapters.safetensors"))
        with torch.no_grad():
            got = fresh(input_ids=eval_ids().to(device)).last_hidden_state.float().cpu()
        want = torch.load(os.path.join(out, f"{mode}_eval.pt"))
        reload_err = float((got - want).norm() / want.norm())
        entry = {"world_size": run["world_size"], "param_type": run["param_type"],
                 "loss_first": run["losses"][0], "loss_last": run["losses"][-1],
                 "losses_every_10": run["losses"][::10],
                 "max_loss_diff_vs_single": dev_max,
                 "loss_bound": float(2 * noise + slack),
                 "loss_within_bound": bool(dev_max <= 2 * noise + slack),
                 "reload_rel_err": reload_err,
                 "reload_within_rounding": bool(reload_err <= eps),
                 "tokens_per_s": run["tokens_per_s"],
                 "tokens_per_s_per_gpu": run["tokens_per_s_per_gpu"],
                 "per_gpu_vs_single": None if not single_tps
                 else run["tokens_per_s_per_gpu"] / single_tps}
        res["modes"][mode] = entry
        print(f"{mode:13s} world {entry['world_size']}  loss {entry['loss_first']:.4f} -> "
              f"{entry['loss_last']:.4f}  max |dloss| vs single {dev_max:.2e} (bound "
              f"{entry['loss_bound']:.2e})  reload rel err {reload_err:.1e}  tokens/s/GPU "
              f"{entry['tokens_per_s_per_gpu'] or 0:.0f} ({entry['per_gpu_vs_single'] or 0:.2f}x "
              f"single)", flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="ddp,fsdp2", help="comma list of single, ddp, fsdp2")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU a rank)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--vocab", type=int, default=BERT["vocab_size"])
    ap.add_argument("--hidden", type=int, default=BERT["hidden_size"])
    ap.add_argument("--layers", type=int, default=BERT["num_hidden_layers"])
    ap.add_argument("--heads", type=int, default=BERT["num_attention_heads"])
    ap.add_argument("--inter", type=int, default=BERT["intermediate_size"])
    ap.add_argument("--seq", type=int, default=SEQ_LEN)
    ap.add_argument("--pera-r", type=int, default=ADAPTERS[0][2]["r"])
    ap.add_argument("--genlora-r", type=int, default=ADAPTERS[1][2]["r"])
    ap.add_argument("--num-rbf", type=int, default=ADAPTERS[1][2]["num_rbf"])
    ap.add_argument("--timing-warmup", type=int, default=0,
                    help="steps before tokens/s is timed (0: time every step)")
    ap.add_argument("--report", action="store_true",
                    help="check finished runs in --out (single process) instead of training")
    ap.add_argument("--json", default=None, help="with --report: write the results here")
    args = ap.parse_args()
    configure(args)
    if args.report:
        report(args.out, args.device, args.json)
        return
    modes = args.modes.split(",")
    distributed = "WORLD_SIZE" in os.environ
    if any(m not in ("single", "single_accum") for m in modes) and not distributed:
        raise SystemExit("ddp/fsdp2 need several processes: launch with torchrun")
    device = args.device
    if distributed:
        local = int(os.environ.get("LOCAL_RANK", 0))
        if device == "cuda":
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        for mode in modes:
            losses, _ = train(mode, args.steps, args.global_batch, args.lr, device, args.out,
                              timing_warmup=args.timing_warmup)
            if _rank_world()[0] == 0:
                shown = losses if len(losses) <= 8 else losses[:4] + losses[-4:]
                print(f"{mode}: world {_rank_world()[1]}, {len(losses)} steps, losses " +
                      " ".join(f"{v:.6f}" for v in shown), flush=True)
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
