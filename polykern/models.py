"""Model-level helpers: inject adapters, merge and unload, move and save adapter state.

They see only modules (``polykern.modules``); the math stays in ``polykern.reference``.
"""

from __future__ import annotations

import json
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from .modules import AdapterLinear, GenLoraLinear, PeraLinear

__all__ = ["inject_adapters", "merge_and_unload", "adapter_state_dict", "load_adapter_state_dict",
           "save_adapters", "load_adapters", "count_parameters", "adapter_modules"]

METHODS = {"pera": PeraLinear, "genlora": GenLoraLinear, "lora": PeraLinear}
_METADATA_KEY = "polykern_adapters"
_FORMAT_VERSION = "1"


def _matcher(target_modules: Union[str, Sequence[str]]):
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return lambda name: pattern.fullmatch(name) is not None
    suffixes = list(target_modules)
    if not suffixes or not all(isinstance(s, str) for s in suffixes):
        raise TypeError("target_modules must be a regex string or a non-empty list of name "
                        f"suffixes, got {target_modules!r}")
    return lambda name: any(name == s or name.endswith("." + s) for s in suffixes)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def adapter_modules(model: nn.Module) -> Iterable[Tuple[str, AdapterLinear]]:
    """``(qualified name, module)`` for every polykern adapter layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLinear)]


def inject_adapters(model: nn.Module, target_modules: Union[str, Sequence[str]],
                    method: str = "pera", **cfg) -> List[str]:
    """Replace, in place, every ``nn.Linear`` whose qualified name matches ``target_modules`` (a
    list of name suffixes such as ``["q_proj", "v_proj"]``, or a regex matched against the whole
    name) by an adapter layer wrapping it; freeze every other parameter except the adapters of
    earlier calls (so PERA in attention and GenLoRA in the MLP can be injected one after the
    other). ``method`` is "pera", "genlora" or "lora" (PeraLinear with ``terms="none"``); ``cfg``
    goes to the layer (``r``, ``alpha``, ``terms``, ``num_rbf``, ...). Returns the replaced
    names."""
    if method not in METHODS:
        raise ValueError(f"unknown adapter method {method!r}: expected one of {sorted(METHODS)}")
    if method == "lora":
        if cfg.setdefault("terms", "none") != "none":
            raise ValueError("method='lora' is PERA with terms='none'; do not pass terms")
    match = _matcher(target_modules)
    targets = [n for n, m in model.named_modules()
               if type(m) is nn.Linear and n and match(n)]
    if not targets:
        raise ValueError(f"no nn.Linear in the model matches target_modules={target_modules!r}")
    earlier = {id(p) for _, m in adapter_modules(model) for p in m.adapter_parameters()}
    for p in model.parameters():
        if id(p) not in earlier:
            p.requires_grad_(False)
    for name in targets:
        _set_submodule(model, name, METHODS[method].from_linear(model.get_submodule(name), **cfg))
    return targets


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and put back plain ``nn.Linear`` layers (in place)."""
    for name, module in adapter_modules(model):
        if not module.merged:
            module.merge()
        w = module.weight
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device="meta")
        linear.weight = w
        linear.bias = module.bias
        _set_submodule(model, name, linear)
    return model


def adapter_state_dict(model: nn.Module) -> Dict[str, Tensor]:
    """Only the adapter tensors, keyed by qualified parameter name (detached, not copied)."""
    return {f"{name}.{p}": getattr(m, p).detach()
            for name, m in adapter_modules(model) for p in m.adapter_parameter_names}


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, state_dict: Dict[str, Tensor]) -> None:
    """Copy adapter tensors into the model's adapter layers; keys must match exactly."""
    own = {f"{name}.{p}": getattr(m, p)
           for name, m in adapter_modules(model) for p in m.adapter_parameter_names}
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise KeyError(f"adapter state does not match the model: missing {missing[:5]}"
                       f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                       f"{'...' if len(unexpected) > 5 else ''}")
    for k, p in own.items():
        src = state_dict[k]
        if src.shape != p.shape:
            raise ValueError(f"adapter tensor {k}: shape {tuple(src.shape)} in the state, "
                             f"{tuple(p.shape)} in the model")
        p.copy_(src)


def adapter_configs(model: nn.Module) -> Dict[str, Dict]:
    return {name: m.adapter_config() for name, m in adapter_modules(model)}


def save_adapters(model: nn.Module, path: str,
                  state_dict: Optional[Dict[str, Tensor]] = None) -> None:
    """Write the adapter tensors to a safetensors file, with each layer's config in its metadata
    (so ``load_adapters`` can rebuild the adapters on a model that has none). ``state_dict``
    gives already-gathered tensors (e.g. the full state of an FSDP2-sharded model); its keys
    must be ``adapter_state_dict(model)``'s."""
    from safetensors.torch import save_file
    own = adapter_state_dict(model)
    if not own:
        raise ValueError("save_adapters: the model has no polykern adapter layers")
    if state_dict is not None:
        if set(state_dict) != set(own):
            raise KeyError("save_adapters: state_dict keys differ from the model's adapters: "
                           f"missing {sorted(set(own) - set(state_dict))[:5]}, unexpected "
                           f"{sorted(set(state_dict) - set(own))[:5]}")
        own = state_dict
    tensors = {k: v.detach().contiguous() for k, v in own.items()}
    meta = {_METADATA_KEY: json.dumps(adapter_configs(model)), "format": "pt",
            "polykern_format_version": _FORMAT_VERSION}
    save_file(tensors, path, metadata=meta)


def load_adapters(model: nn.Module, path: str) -> List[str]:
    """Load adapters written by ``save_adapters``. Layers that are plain ``nn.Linear`` in
    ``model`` get the adapter the file describes first; returns the adapted layer names."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if _METADATA_KEY not in meta:
        raise ValueError(f"{path} was not written by polykern.save_adapters (no "
                         f"'{_METADATA_KEY}' metadata)")
    configs = json.loads(meta[_METADATA_KEY])
    existing = dict(adapter_modules(model))
    for name, cfg in configs.items():
        cfg = dict(cfg)
        method = cfg.pop("method")
        adapter_dtype = getattr(torch, cfg.pop("adapter_dtype"))
        if name in existing:
            have = existing[name].adapter_config()
            if have["method"] != method or any(have.get(k) != v for k, v in cfg.items()):
                raise ValueError(f"layer {name}: the model's adapter {have} differs from the "
                                 f"file's {dict(cfg, method=method)}")
            continue
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise KeyError(f"{path} holds an adapter for {name!r}, which the model lacks")
        if type(linear) is not nn.Linear:
            raise TypeError(f"layer {name} is a {type(linear).__name__}, not an nn.Linear")
        layer = METHODS[method].from_linear(linear, adapter_dtype=adapter_dtype, **cfg)
        _set_submodule(model, name, layer)
    sd = load_file(path, device=str(next(model.parameters()).device))
    load_adapter_state_dict(model, sd)
    return list(configs)


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared tensors counted once)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
