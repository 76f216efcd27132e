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


def build_model(seed: int = 0, adapters: bool = True, device="cpu") -> nn.Module:
    """The seeded BERT, with the ``ADAPTERS`` injected (or plain, to load adapters into)."""
    import transformers
    torch.manual_seed(seed)
    model = transformers.BertModel(transformers.BertConfig(**BERT), add_pooling_layer=False)
    if adapters:
        for method, targets, cfg in ADAPTERS:
            polykern.inject_adapters(model, targets, method=method, **cfg)
    return model.to(device)


def global_batch(step: int, size: int, seed: int = 1234) -> Tuple[Tensor, Tensor]:
    """Step ``step``'s batch: ``ids (size, SEQ_LEN)`` and regression targets ``(size, hidden)``."""
    g = torch.Generator().manual_seed(seed + step)
    ids = torch.randint(0, BERT["vocab_size"], (size, SEQ_LEN), generator=g)
    target = torch.randn(size, BERT["hidden_size"], generator=g)
    return ids, target


def loss_fn(model: nn.Module, ids: Tensor, target: Tensor) -> Tensor:
    """Mean-pooled last hidden state regressed on ``target``: mean over the rows given."""
    hidden = model(input_ids=ids).last_hidden_state           # (batch, seq, hidden)
    return (hidden.mean(1) - target).square().mean()


def _rank_world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def wrap(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """``single``: as is; ``ddp``: DistributedDataParallel; ``fsdp2``: ``fully_shard`` on each
    encoder layer, then on the root (FSDP2 shards every parameter, frozen ones included, and
    reduce-scatters the gradients of the trainable ones)."""
    if mode == "single":
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
    raise ValueError(f"unknown mode {mode!r}: expected single, ddp or fsdp2")


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
          device: str = "cpu", out: str = None, seed: int = 0) -> Tuple[List[float], nn.Module]:
    """Train ``steps`` AdamW steps in ``mode``; returns the global-batch losses and the (unwrapped)
    model. With ``out``, rank 0 writes ``<mode>_run.json`` and ``<mode>_adapters.safetensors``.
    """
    rank, world = _rank_world()
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
    for step in range(steps):
        ids, target = global_batch(step, global_batch_size)
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = loss_fn(wrapped, ids[rows].to(dev), target[rows].to(dev))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        logged = loss.detach()
        if world > 1:   # each rank's loss is the mean over equal slices: average them
            dist.all_reduce(logged)
            logged = logged / world
        losses.append(float(logged))
    tensors = gather_adapter_state(model, wrapped)
    if out is not None and rank == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"{mode}_run.json"), "w") as f:
            json.dump({"losses": losses, "world_size": world, "param_type": param_type,
                       "device": str(dev)}, f)
        polykern.save_adapters(model, os.path.join(out, f"{mode}_adapters.safetensors"),
                               state_dict=tensors)
    if world > 1:
        dist.barrier()
    return losses, model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="ddp,fsdp2", help="comma list of single, ddp, fsdp2")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU a rank)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    modes = args.modes.split(",")
    distributed = "WORLD_SIZE" in os.environ
    if any(m != "single" for m in modes) and not distributed:
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
            losses, _ = train(mode, args.steps, args.global_batch, args.lr, device, args.out)
            if _rank_world()[0] == 0:
                print(f"{mode}: world {_rank_world()[1]}, losses " +
                      " ".join(f"{v:.6f}" for v in losses), flush=True)
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
