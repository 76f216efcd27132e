"""End-to-end demo: adapt a tiny frozen transformer LM with LoRA, PERA and GenLoRA.

Run with ``python -m polykern.demo`` (under a minute on one CPU core). Steps:

1. Build a tiny pre-norm causal transformer LM from a fixed seed (random weights, no
   pretraining): token and position embeddings, 2 blocks of causal self-attention with separate
   ``q_proj``/``k_proj``/``v_proj``/``o_proj`` and an MLP (``up_proj``, ``down_proj``), final
   LayerNorm and an LM head.
2. For each method, inject adapters into the attention and MLP linears of a fresh copy of that base
   (``polykern.inject_adapters``; everything else is frozen) and train them with AdamW on a
   synthetic next-token task the random base cannot do: two interleaved chains of a fixed random
   permutation, ``x[t] = perm[x[t-2]]``, which needs attention to the token two places back.
3. Print a table (trainable and total parameters, loss before and after, training tokens/s), check
   that every loss fell clearly, then merge the adapters into a copy of each model
   (``polykern.merge_and_unload``) and check that the merged model reproduces the adapted logits.

Exits with status 1 if a loss did not fall or a merged model departs from its adapted model by more
than the dtype's tolerance.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

import polykern

# Adapted layers: every linear of the attention and the MLP (the LM head stays a frozen nn.Linear).
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]

# (label, inject_adapters method, its config). PERA's expansion adds only r(r+1)/2 coefficients per
# layer to LoRA's r (in + out), so PERA at the same r has (almost) the same trainable budget as
# LoRA: r = 8 for both. GenLoRA synthesises its factors from a latent, so it trains far fewer.
METHODS: List[Tuple[str, str, Dict]] = [
    ("LoRA r=8", "lora", {"r": 8}),
    ("PERA full r=8", "pera", {"r": 8, "terms": "full"}),
    ("GenLoRA r=8 K=32", "genlora", {"r": 8, "num_rbf": 32}),
]

# Merge check, relative tolerance by compute dtype (see check_merge).
MERGE_RTOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}

# A loss "clearly decreased" if the final loss is at most this fraction of the initial one.
MAX_FINAL_OVER_INITIAL = 0.7


@dataclass
class Config:
    """Model and task sizes (small enough for a ~45 s CPU run of all three methods)."""
    vocab: int = 24         # V: token alphabet of the task
    seq_len: int = 32       # L: tokens per sequence
    d_model: int = 128      # d
    n_heads: int = 4
    n_layers: int = 2
    d_mlp: int = 256        # hidden width of the MLP
    batch: int = 32         # sequences per training step
    lr: float = 1e-2        # AdamW learning rate for the adapter parameters
    eval_batch: int = 256   # sequences in the fixed held-out batch the losses are measured on


# ------------------------------------------------------------------------------------------------
# The tiny transformer LM
# ------------------------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v/o projections."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape                                   # x: (b, t, d)
        h = self.n_heads

        def heads(y: Tensor) -> Tensor:                     # (b, t, d) -> (b, h, t, d / h)
            return y.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, h, t, d / h)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))       # (b, t, d)


class MLP(nn.Module):
    """Two-layer GELU MLP: d -> d_mlp -> d."""

    def __init__(self, d_model: int, d_mlp: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(d_model, d_mlp)
        self.down_proj = nn.Linear(d_mlp, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))      # (b, t, d) -> (b, t, d)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_heads: int, d_mlp: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_mlp)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Tiny pre-norm causal transformer LM: ``tokens (b, t) -> logits (b, t, V)``."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads, cfg.d_mlp)
                                    for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(pos)        # (b, t, d)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))                   # (b, t, V)


# ------------------------------------------------------------------------------------------------
# The synthetic task
# ------------------------------------------------------------------------------------------------
class SkipPermTask:
    """Sequences with ``x[t] = perm[x[t-2]]`` for t >= 2 (x[0], x[1] uniform, independent).

    ``perm`` is a fixed random permutation of the alphabet (drawn from ``seed``): each sequence is
    two interleaved chains of it. Predicting x[t] needs the token two places back, so a model must
    learn an attention pattern (skip the previous token) as well as the permutation; the loss counts
    the predictable positions t >= 2 only. The random base model is at chance (ln V nats) or worse.
    """

    def __init__(self, vocab: int, seq_len: int, seed: int) -> None:
        self.vocab, self.seq_len = vocab, seq_len
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.perm = torch.randperm(vocab, generator=self.gen)          # (V,)

    def sample(self, batch: int) -> Tensor:
        """``(batch, L)`` int64 tokens on the CPU."""
        x = torch.empty(batch, self.seq_len, dtype=torch.long)
        x[:, :2] = torch.randint(self.vocab, (batch, 2), generator=self.gen)
        for t in range(2, self.seq_len):
            x[:, t] = self.perm[x[:, t - 2]]
        return x


def lm_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    """Mean cross-entropy of predicting ``tokens[:, t]`` from ``tokens[:, :t]`` for t >= 2."""
    logits = model(tokens[:, :-1]).float()                  # (b, L-1, V); logits[:, t-1] -> x[t]
    return F.cross_entropy(logits[:, 1:].reshape(-1, logits.shape[-1]),
                           tokens[:, 2:].reshape(-1))


@torch.no_grad()
def eval_loss(model: nn.Module, tokens: Tensor) -> float:
    model.eval()
    loss = lm_loss(model, tokens).item()
    model.train()
    return loss


# ------------------------------------------------------------------------------------------------
# Train, measure, merge
# ------------------------------------------------------------------------------------------------
@dataclass
class Result:
    label: str
    trainable: int
    total: int
    initial_loss: float
    final_loss: float
    tokens_per_s: float
    merge_err: float = math.nan
    merge_tol: float = math.nan


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one(label: str, method: str, method_cfg: Dict, base: nn.Module, batches: List[Tensor],
              eval_tokens: Tensor, cfg: Config, args: argparse.Namespace,
              device: torch.device, dtype: torch.dtype) -> Tuple[Result, nn.Module]:
    """Adapt a copy of ``base`` with ``method`` and train it with AdamW, one step per batch of
    ``batches`` (each ``(batch, L)`` tokens on the CPU)."""
    torch.manual_seed(args.seed + 2)        # the adapters' initialisation, the same per method
    model = copy.deepcopy(base)
    extra = {"adapter_dtype": torch.float32} if dtype != torch.float32 else {}
    polykern.inject_adapters(model, TARGET_MODULES, method=method, **method_cfg, **extra)
    trainable, total = polykern.count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    steps = len(batches)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(        # 5% linear warm-up, then cosine to 10%
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20))
        * (0.55 + 0.45 * math.cos(math.pi * s / steps)))
    initial = eval_loss(model, eval_tokens)

    model.train()
    _sync(device)
    t0 = time.perf_counter()
    bar = tqdm(batches, desc=f"{label:<17}", unit="step", leave=True,
               dynamic_ncols=True, mininterval=0.5)
    for step, tokens in enumerate(bar):
        loss = lm_loss(model, tokens.to(device, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    _sync(device)
    elapsed = time.perf_counter() - t0
    bar.close()

    final = eval_loss(model, eval_tokens)
    tokens_per_s = steps * cfg.batch * (cfg.seq_len - 1) / elapsed
    return Result(label, trainable, total, initial, final, tokens_per_s), model


@torch.no_grad()
def check_merge(model: nn.Module, tokens: Tensor, dtype: torch.dtype) -> Tuple[float, float]:
    """Merge a deep copy of ``model`` and compare its logits with the adapted model's.

    Returns ``(err, allowed)``. In fp32: ``err = max |merged - adapted|`` and
    ``allowed = rtol * max(1, max |adapted|)``. In bf16 neither model is exact (the merged one
    rounds ``W + Delta W`` to bf16, the adapted one rounds its two paths separately), so both are
    held to an fp32 copy of the adapted model: ``err = max |merged - exact|`` and ``allowed =
    2 max |adapted - exact| + rtol * max(1, max |exact|)``: merging may cost no more than twice
    the rounding error the adapted bf16 model already has.
    """
    model.eval()
    adapted = model(tokens).float()                       # (b, t, V)
    merged_model = polykern.merge_and_unload(copy.deepcopy(model))
    if any(isinstance(m, polykern.AdapterLinear) for m in merged_model.modules()):
        raise RuntimeError("merge_and_unload left adapter layers in the model")
    merged = merged_model(tokens).float()
    if dtype == torch.float32:
        exact, own_err = adapted, 0.0
    else:
        exact = copy.deepcopy(model).float()(tokens)      # adapters are fp32 already
        own_err = (adapted - exact).abs().max().item()
    err = (merged - exact).abs().max().item()
    allowed = 2.0 * own_err + MERGE_RTOL[dtype] * max(1.0, exact.abs().max().item())
    return err, allowed


def print_table(results: List[Result]) -> None:
    head = (f"{'method':<18} {'trainable':>10} {'total':>9} {'initial loss':>12} "
            f"{'final loss':>10} {'tokens/s':>9} {'merge err':>15} {'allowed':>8}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r.label:<18} {r.trainable:>10,} {r.total:>9,} {r.initial_loss:>12.4f} "
              f"{r.final_loss:>10.4f} {r.tokens_per_s:>9,.0f} {r.merge_err:>15.2e} "
              f"{r.merge_tol:>8.1e}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m polykern.demo", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=250, help="training steps per method (250)")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the base model, task and adapters")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the frozen base model (adapters train in fp32); default "
                        "float32 (bfloat16 is meant for CUDA: on most CPUs it is far slower)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 on CPU: this model's ops are too small to "
                        "gain much from more, about 1.5x on two idle cores, and on a busy machine "
                        "every op then waits for the busiest core, 2-10x slower)")
    args = p.parse_args(argv)
    if args.steps <= 0:
        p.error("--steps must be positive")
    if args.threads is not None and args.threads <= 0:
        p.error("--threads must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    if args.threads is not None or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    cfg = Config()

    torch.manual_seed(args.seed)
    base = TinyLM(cfg).to(device=device, dtype=dtype)     # random, frozen once adapted
    task = SkipPermTask(cfg.vocab, cfg.seq_len, args.seed)
    eval_tokens = task.sample(cfg.eval_batch).to(device)  # (eval_batch, L), fixed held-out batch
    # The same training batches for every method, drawn up front (off the clock): steps x (batch, L)
    batches = [task.sample(cfg.batch) for _ in range(args.steps)]
    kernels = "CUDA ops" if device.type == "cuda" and polykern.cuda_available() else "reference"
    print(f"polykern {polykern.__version__} demo | torch {torch.__version__} | device {device} "
          f"({kernels} path) | dtype {args.dtype} | seed {args.seed} | steps {args.steps} | "
          f"CPU threads {torch.get_num_threads()}")
    print(f"task: x[t] = perm[x[t-2]], V = {cfg.vocab}, L = {cfg.seq_len}; chance loss "
          f"ln V = {math.log(cfg.vocab):.3f}; model d={cfg.d_model}, {cfg.n_layers} blocks, "
          f"{cfg.n_heads} heads, MLP {cfg.d_mlp}; adapted: {', '.join(TARGET_MODULES)}")

    t_start = time.perf_counter()
    results: List[Result] = []
    models: List[nn.Module] = []
    for label, method, method_cfg in METHODS:
        res, model = train_one(label, method, method_cfg, base, batches, eval_tokens, cfg, args,
                               device, dtype)
        results.append(res)
        models.append(model)

    for res, model in zip(results, models):
        res.merge_err, res.merge_tol = check_merge(model, eval_tokens[:, :-1], dtype)

    print()
    print_table(results)
    print()

    ok = True
    for r in results:
        if not r.final_loss <= MAX_FINAL_OVER_INITIAL * r.initial_loss:
            print(f"FAIL {r.label}: loss {r.initial_loss:.4f} -> {r.final_loss:.4f} did not fall "
                  f"below {MAX_FINAL_OVER_INITIAL:g} x the initial loss")
            ok = False
    if ok:
        print(f"loss check: every method's held-out loss fell to <= {MAX_FINAL_OVER_INITIAL:g} x "
              "its initial value (" + ", ".join(
                  f"{r.label}: {r.final_loss / r.initial_loss:.2f}x" for r in results) + ")")
    for r in results:
        if not r.merge_err <= r.merge_tol:
            print(f"FAIL {r.label}: merged model's logits are off by {r.merge_err:.3e} > "
                  f"{r.merge_tol:.3e}")
            ok = False
    if all(r.merge_err <= r.merge_tol for r in results):
        rule = (f"max |merged - adapted| <= {MERGE_RTOL[dtype]:g} x max(1, max |logit|)"
                if dtype == torch.float32
                else "max |merged - fp32 adapted| <= 2 x the bf16 adapted model's own error "
                     f"+ {MERGE_RTOL[dtype]:g} x max(1, max |logit|)")
        print(f"merge check: every merged model reproduces its adapted logits ({rule})")
    print(f"total time {time.perf_counter() - t_start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
