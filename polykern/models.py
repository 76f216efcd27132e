"""Model-level helpers: inject adapters, merge and unload, move and save adapter state.

They see only modules (``polykern.modules``); the math stays in ``polykern.reference``.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from .modules import AdapterLinear, GenLoraLinear, PeraLinear, is_wrappable

__all__ = ["inject_adapters", "merge_and_unload", "adapter_state_dict", "load_adapter_state_dict",
           "save_adapters", "load_adapters", "count_parameters", "adapter_modules"]

METHODS = {"pera": PeraLinear, "genlora": GenLoraLinear, "lora": PeraLinear}
_METADATA_KEY = "polykern_adapters"
_CHECKSUM_KEY = "polykern_checksums_sha256"
_FORMAT_VERSION = "2"          # 2: a SHA-256 of each tensor's bytes in the metadata


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


def _freeze_all_but_adapters(model: nn.Module) -> None:
    """Freeze every parameter that is not an adapter's (adapters keep their own flags)."""
    adapters = {id(p) for _, m in adapter_modules(model) for p in m.adapter_parameters()}
    for p in model.parameters():
        if id(p) not in adapters:
            p.requires_grad_(False)


def _describe(module: nn.Module) -> str:
    """Why the adapter layers do not wrap ``module`` (which ``is_wrappable`` refused)."""
    kind = type(module).__name__
    if isinstance(module, AdapterLinear):
        return f"already adapted (a {kind})"
    if isinstance(module, nn.Linear):
        return (f"a {kind}, a subclass of nn.Linear, which the adapters do not wrap (its forward "
                "may compute something other than x W^T + b)")
    return f"a {kind}, not an nn.Linear or transformers' Conv1D"


def _why_nothing_matched(model: nn.Module, target_modules, matched) -> str:
    """The error for a ``target_modules`` that selects no layer to adapt, saying why."""
    if matched:
        reasons = "; ".join(f"{n} is {_describe(m)}" for n, m in matched[:5])
        more = f" (and {len(matched) - 5} more)" if len(matched) > 5 else ""
        return (f"target_modules={target_modules!r} selects no nn.Linear or Conv1D to adapt: "
                f"{reasons}{more}")
    message = f"no module name in the model matches target_modules={target_modules!r}"
    if not isinstance(target_modules, str):
        return message
    names = [n for n, _ in model.named_modules() if n]
    ending = [n for n in names if n.endswith("." + target_modules)]
    if ending:
        return (f"{message}: a string is a regex matched against the full name, and "
                f"{len(ending)} module names end in {target_modules!r} ({ending[0]!r}, ...); "
                f"to match name suffixes pass a list, [{target_modules!r}]")
    example = f" (such as {names[-1]!r})" if names else ""
    return (f"{message}: a string is a regex matched against the full name{example}; to match "
            f"name suffixes pass a list, such as [{target_modules!r}]")


def inject_adapters(model: nn.Module, target_modules: Union[str, Sequence[str]],
                    method: str = "pera", **cfg) -> List[str]:
    """Replace, in place, every ``nn.Linear`` (exactly, not a subclass) or transformers'
    ``Conv1D`` (GPT-2) whose qualified name matches ``target_modules`` (a list of name suffixes
    such as ``["q_proj", "v_proj"]``, or a regex matched against the whole name) by an adapter
    layer wrapping it; matching modules of other types are left alone, and when none of them can
    be adapted a ``ValueError`` says why. Freeze every other parameter except the adapters of
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
    matched = [(n, m) for n, m in model.named_modules() if n and match(n)]
    targets = [n for n, m in matched if is_wrappable(m)]
    if not targets:
        raise ValueError(_why_nothing_matched(model, target_modules, matched))
    for name in targets:
        _set_submodule(model, name, METHODS[method].from_linear(model.get_submodule(name), **cfg))
    _freeze_all_but_adapters(model)
    return targets


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and put back the plain layers (in place): an
    ``nn.Linear``, or transformers' ``Conv1D`` where the adapter wrapped one."""
    for name, module in adapter_modules(model):
        if not module.merged:
            module.merge()
        if module.fan_in_fan_out:
            from transformers.pytorch_utils import Conv1D
            with torch.device("meta"):            # its weight is replaced at once
                base = Conv1D(module.out_features, module.in_features)
        else:
            base = nn.Linear(module.in_features, module.out_features,
                             bias=module.bias is not None, device="meta")
        base.weight = module.weight
        base.bias = module.bias
        _set_submodule(model, name, base)
    return model


def _adapter_tensors(layers: Dict[str, AdapterLinear]) -> Dict[str, Tensor]:
    """The adapter parameters of ``layers`` (by qualified layer name), keyed by qualified
    parameter name."""
    return {f"{name}.{p}": getattr(m, p) for name, m in layers.items()
            for p in m.adapter_parameter_names}


def adapter_state_dict(model: nn.Module) -> Dict[str, Tensor]:
    """Only the adapter tensors, keyed by qualified parameter name (detached, not copied)."""
    return {k: p.detach() for k, p in _adapter_tensors(dict(adapter_modules(model))).items()}


def _check_state(own: Dict[str, Tensor], state_dict: Dict[str, Tensor], source: str) -> None:
    """Raise unless ``state_dict`` has exactly ``own``'s keys and shapes (``KeyError`` for the
    keys, ``ValueError`` for a shape); ``source`` names where the state comes from."""
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise KeyError(f"adapter state does not match the model: missing {missing[:5]}"
                       f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                       f"{'...' if len(unexpected) > 5 else ''}")
    for k, p in own.items():
        if state_dict[k].shape != p.shape:
            raise ValueError(f"adapter tensor {k}: shape {tuple(state_dict[k].shape)} in "
                             f"{source}, {tuple(p.shape)} in the model")


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, state_dict: Dict[str, Tensor]) -> None:
    """Copy adapter tensors into the model's adapter layers; keys and shapes must match exactly,
    and are all checked before the first copy."""
    own = _adapter_tensors(dict(adapter_modules(model)))
    _check_state(own, state_dict, "the state")
    for k, p in own.items():
        p.copy_(state_dict[k])


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
            "polykern_format_version": _FORMAT_VERSION,
            _CHECKSUM_KEY: json.dumps({k: _sha256(v) for k, v in tensors.items()})}
    save_file(tensors, path, metadata=meta)


def _sha256(t: Tensor) -> str:
    """SHA-256 of a tensor's bytes as safetensors stores them (row-major, native order)."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return hashlib.sha256(raw.tobytes()).hexdigest()


def _check_checksums(path: str, meta: Dict[str, str], tensors: Dict[str, Tensor]) -> None:
    """Raise ``ValueError`` naming the first tensor whose bytes differ from those written.
    Files written before checksums (format version 1) have none to check."""
    if _CHECKSUM_KEY not in meta:
        return
    sums = json.loads(meta[_CHECKSUM_KEY])
    for k, t in tensors.items():
        if k not in sums:
            raise ValueError(f"{path}: the metadata has no checksum for tensor {k!r}; the file "
                             "was changed after save_adapters wrote it")
        if _sha256(t) != sums[k]:
            raise ValueError(f"{path}: tensor {k!r} does not match its checksum: its bytes "
                             "were changed or damaged after save_adapters wrote them")


def _config_differences(have: Dict, wanted: Dict) -> List[str]:
    """``"key: model <value>, file <value>"`` for each key of the file's config ``wanted`` whose
    value the model's adapter config ``have`` does not share (the adapter dtype is not
    compared: loading casts to the model's)."""
    return [f"{k}: model {have.get(k)!r}, file {v!r}" for k, v in wanted.items()
            if k != "adapter_dtype" and have.get(k) != v]


def load_adapters(model: nn.Module, path: str) -> List[str]:
    """Load adapters written by ``save_adapters``. Layers that are plain ``nn.Linear`` (or
    transformers' ``Conv1D``) in ``model`` get the adapter the file describes first; every
    parameter that is not an adapter's is frozen, as ``inject_adapters`` does. The file (its
    checksums) and the model (layer names, configs, shapes) are checked in full before the first
    change, so on any error the model is as it was. Returns the adapted layer names."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if _METADATA_KEY not in meta:
        raise ValueError(f"{path} was not written by polykern.save_adapters (no "
                         f"'{_METADATA_KEY}' metadata)")
    configs = json.loads(meta[_METADATA_KEY])
    state = load_file(path)
    _check_checksums(path, meta, state)
    existing = dict(adapter_modules(model))
    new: Dict[str, Tuple[nn.Module, type, Dict]] = {}       # name -> (base, class, config)
    planned = dict(existing)       # the adapter layers after loading; new ones built on meta
    for name, cfg in configs.items():
        if name in existing:
            differences = _config_differences(existing[name].adapter_config(), cfg)
            if differences:
                raise ValueError(f"layer {name}: the model's adapter differs from the file's: "
                                 + "; ".join(differences))
            continue
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise KeyError(f"{path} holds an adapter for {name!r}, which the model lacks")
        if not is_wrappable(base):
            raise TypeError(f"layer {name} is {_describe(base)}")
        cfg = dict(cfg)
        cls = METHODS[cfg.pop("method")]
        cfg["adapter_dtype"] = getattr(torch, cfg["adapter_dtype"])
        new[name] = (base, cls, cfg)
        with torch.random.fork_rng(devices=[]):      # a check; the real build draws later
            planned[name] = cls.shaped_like(base, device="meta", **cfg)
    own = _adapter_tensors(planned)
    _check_state(own, state, "the file")
    for name, (base, cls, cfg) in new.items():
        _set_submodule(model, name, cls.from_linear(base, **cfg))
    load_adapter_state_dict(model, state)
    _freeze_all_but_adapters(model)
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
