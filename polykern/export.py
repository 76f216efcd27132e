"""Export PERA and GenLoRA adapters as a standard peft LoRA adapter, the format serving engines
(vLLM, SGLang) and plain ``peft.PeftModel.from_pretrained`` load.

An adapted layer computes ``y = x W^T + b + s (x A^T) B^T`` with generated factors ``A (R, in)``
and ``B (out, R)`` (PERA: ``R = r + P``, 152 for ``r = 16, terms="full"``; GenLoRA: ``R = r``).
Once training is over the generators are no longer needed: the same update is a plain LoRA of
rank R with ``lora_A = A`` and ``lora_B = s B``. The scaling is folded into ``lora_B`` and every
layer gets ``lora_alpha = r``, so peft's scaling ``lora_alpha / r`` is exactly 1 (a multiplication
by 1 changes no bit): a reader that applies ``rank_pattern`` / ``alpha_pattern`` and one that
only reads the global ``r`` and ``lora_alpha`` compute the same update.

The files: ``adapter_config.json`` (``peft_type: LORA``, ``r`` the largest R, a ``rank_pattern``
and ``alpha_pattern`` entry for each layer of another R, ``target_modules`` the adapted layers'
full names) and ``adapter_model.safetensors`` (``base_model.model.<layer>.lora_A.weight (R, in)``
and ``.lora_B.weight (out, R)``, peft's key layout).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Dict, NamedTuple, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .models import METHODS, _METADATA_KEY, _check_checksums, adapter_modules

__all__ = ["export_lora", "export_lora_file", "LoraFactors"]

_PEFT_PREFIX = "base_model.model."          # peft's key prefix in adapter_model.safetensors


class LoraFactors(NamedTuple):
    """One layer's exported update ``Delta W = lora_B @ lora_A`` (``(out, in)``)."""
    lora_A: Tensor            # (R, in)
    lora_B: Tensor            # (out, R), the scaling folded in
    fan_in_fan_out: bool      # the base layer is transformers' Conv1D (weight (in, out))


@torch.no_grad()
def _folded(A: Tensor, B: Tensor, scaling: float, fan_in_fan_out: bool) -> LoraFactors:
    # B * scaling is the product the forward itself forms (reference.adapter_linear).
    return LoraFactors(A.detach(), (B * scaling).detach(), fan_in_fan_out)


def _peft_bridge_factors(model: nn.Module, adapter_name: str) -> Dict[str, LoraFactors]:
    """The polykern peft-bridge layers' factors for ``adapter_name``, keyed by their names in
    the base model. polykern.peft is only consulted when it was imported: a model cannot hold
    its layers otherwise."""
    bridge = sys.modules.get("polykern.peft")
    if bridge is None:
        return {}
    out = {}
    for name, layer in bridge.polykern_layers(model):
        if adapter_name in layer.polykern_config:
            A, B = layer.factors(adapter_name)
            out[name] = _folded(A, B, layer.scaling[adapter_name], False)
    return out


def _unexported_peft_layers(model: nn.Module, adapter_name: str, exported) -> list:
    """Names of peft's own LoRA layers holding ``adapter_name`` (targets the bridge left to
    peft), which this export does not cover."""
    lora_layer = getattr(sys.modules.get("peft.tuners.lora"), "LoraLayer", None)
    if lora_layer is None:
        return []
    return [n for n, m in model.named_modules() if isinstance(m, lora_layer) and n not in exported
            and adapter_name in getattr(m, "r", {})]


def _base_model(model: nn.Module) -> nn.Module:
    """The model whose module names the export uses: a ``PeftModel``'s base model, or ``model``."""
    peft_model = getattr(sys.modules.get("peft"), "PeftModel", None)
    return model.get_base_model() if peft_model and isinstance(model, peft_model) else model


@torch.no_grad()        # the factors are data to write: no autograd graph for them
def lora_factors(model: nn.Module, adapter_name: Optional[str] = None) -> Dict[str, LoraFactors]:
    """Each adapted layer's exported factors, keyed by the layer's name in the base model: the
    layers ``polykern.inject_adapters`` made, or, in a ``PeftModel`` built through
    ``polykern.peft``, the layers holding ``adapter_name`` (default: the active adapter)."""
    base = _base_model(model)
    if adapter_name is None:
        adapter_name = getattr(model, "active_adapter", "default")
    out = {name: _folded(*m._factors(), m.scaling, m.fan_in_fan_out)
           for name, m in adapter_modules(base)}
    out.update(_peft_bridge_factors(base, adapter_name))
    left = _unexported_peft_layers(base, adapter_name, out)
    if left:
        raise NotImplementedError(f"export_lora exports polykern layers; {left[:3]} are peft's "
                                  "own LoRA layers (targets that are not nn.Linear)")
    if not out:
        raise ValueError("export_lora: the model has no polykern adapter layers"
                         + ("" if base is model else f" holding adapter {adapter_name!r}"))
    return out


def _features(method: str, tensors: Dict[str, Tensor]):
    """``(in_features, out_features)`` of a layer from its saved adapter tensors."""
    if method == "genlora":
        return tensors["genlora_a_latent"].shape[0], tensors["genlora_b_latent"].shape[0]
    return tensors["lora_A"].shape[1], tensors["lora_B"].shape[0]


@torch.no_grad()
def lora_factors_from_file(path: str, fan_in_fan_out: bool = False) -> Dict[str, LoraFactors]:
    """Each layer's exported factors from a file ``polykern.save_adapters`` wrote (checksums
    checked). No base model is needed: each layer is rebuilt on the meta device from the config
    in the file's metadata and given the file's tensors, and its own ``_factors()`` generates.
    The file does not say whether a base layer is a ``Conv1D``: ``fan_in_fan_out`` says it for
    all of them."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if _METADATA_KEY not in meta:
        raise ValueError(f"{path} was not written by polykern.save_adapters (no "
                         f"'{_METADATA_KEY}' metadata)")
    state = load_file(path)
    _check_checksums(path, meta, state)
    out = {}
    for name, cfg in json.loads(meta[_METADATA_KEY]).items():
        cfg = dict(cfg)
        cls = METHODS[cfg.pop("method")]
        cfg["adapter_dtype"] = getattr(torch, cfg["adapter_dtype"])
        tensors = {p: state[f"{name}.{p}"] for p in cls.adapter_parameter_names}
        with torch.random.fork_rng(devices=[]):     # its initialisation is overwritten at once
            layer = cls(*_features(cls.method, tensors), bias=False, device="meta", **cfg)
        for p, t in tensors.items():
            setattr(layer, p, nn.Parameter(t, requires_grad=False))
        out[name] = _folded(*layer._factors(), layer.scaling, fan_in_fan_out)
    return out


def write_peft_lora(factors: Dict[str, LoraFactors], directory: str,
                    base_model_name_or_path: Optional[str] = None,
                    task_type: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> Dict:
    """Write ``factors`` (layer name in the base model -> :class:`LoraFactors`) as a peft LoRA
    adapter in ``directory`` (created if needed); ``dtype`` casts the tensors (default: kept).
    Returns the config written to ``adapter_config.json``."""
    from safetensors.torch import save_file
    ranks = {name: f.lora_A.shape[0] for name, f in factors.items()}
    r = max(ranks.values())
    # lora_alpha = rank for every layer: peft's scaling is 1, the update is lora_B @ lora_A.
    other = {name: R for name, R in ranks.items() if R != r}
    conv1d = {f.fan_in_fan_out for f in factors.values()}
    config = {
        "peft_type": "LORA", "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path, "revision": None,
        "r": r, "lora_alpha": r, "rank_pattern": other, "alpha_pattern": dict(other),
        "target_modules": sorted(factors), "lora_dropout": 0.0, "bias": "none",
        # peft corrects this flag per layer (Conv1D or nn.Linear) with a warning when mixed.
        "fan_in_fan_out": True in conv1d, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None,
    }
    tensors = {}
    for name, f in factors.items():
        for key, t in (("lora_A", f.lora_A), ("lora_B", f.lora_B)):
            t = t if dtype is None else t.to(dtype)
            tensors[f"{_PEFT_PREFIX}{name}.{key}.weight"] = t.detach().contiguous().cpu()
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return config


def export_lora(model: nn.Module, directory: str, adapter_name: Optional[str] = None,
                dtype: Optional[torch.dtype] = None,
                base_model_name_or_path: Optional[str] = None) -> Dict:
    """Write ``model``'s PERA / GenLoRA adapters to ``directory`` as a standard peft LoRA adapter
    (``adapter_config.json``, ``adapter_model.safetensors``) that plain peft, vLLM and SGLang
    load; see the module docstring for the layout. ``model``: adapted by
    ``polykern.inject_adapters`` (``nn.Linear`` or GPT-2's ``Conv1D``), or a ``PeftModel`` built
    through ``polykern.peft`` (``adapter_name``: which adapter, default the active one).
    ``dtype`` casts the written tensors (e.g. ``torch.bfloat16`` for serving); the factors are
    generated in the adapter parameters' dtype. ``base_model_name_or_path`` defaults to the
    model config's ``name_or_path``. Returns the config written."""
    factors = lora_factors(model, adapter_name)
    task_type = None
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and peft_config:
        chosen = adapter_name or getattr(model, "active_adapter", "default")
        cfg = peft_config.get(chosen)
        task_type = getattr(cfg, "task_type", None)
        if base_model_name_or_path is None:
            base_model_name_or_path = getattr(cfg, "base_model_name_or_path", None)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None)
    task_type = getattr(task_type, "value", task_type)       # peft's TaskType is a str Enum
    return write_peft_lora(factors, directory, base_model_name_or_path or None, task_type, dtype)


def export_lora_file(path: str, directory: str, dtype: Optional[torch.dtype] = None,
                     base_model_name_or_path: Optional[str] = None,
                     fan_in_fan_out: bool = False) -> Dict:
    """:func:`export_lora` from a file ``polykern.save_adapters`` wrote, with no model: the
    factors come from the adapter parameters alone. ``fan_in_fan_out=True`` when the adapted
    layers are GPT-2's ``Conv1D`` (the file does not record it). Returns the config written."""
    return write_peft_lora(lora_factors_from_file(path, fan_in_fan_out), directory,
                           base_model_name_or_path, None, dtype)
