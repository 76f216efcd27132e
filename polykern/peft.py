"""The peft bridge: ``peft.get_peft_model`` builds PERA or GenLoRA layers where it would build LoRA.

peft's custom-module route (``LoraConfig._register_custom_module``, experimental in peft) maps a
layer type to a LoRA-layer class; :func:`register` maps ``nn.Linear`` to a
:class:`PolykernLoraLinear` subclass bound to one polykern method and its options::

    from peft import LoraConfig, get_peft_model
    import polykern.peft

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"])
    polykern.peft.register(config, method="pera", terms="full")   # or "genlora", num_rbf=32
    model = get_peft_model(model, config)            # train, merge_and_unload, save_pretrained
    model.save_pretrained(path)                      # also writes polykern_adapter.json
    ...
    model = polykern.peft.from_pretrained(base_model, path)   # registers and loads

peft does not save a registration: a plain ``PeftModel.from_pretrained`` would build plain LoRA
layers and warn of missing keys. ``save_pretrained`` of a registered config writes polykern's
method and options (:data:`SPEC_FILE`) beside ``adapter_config.json``, and :func:`from_pretrained`
reads them.

The layer keeps peft's LoRA-layer contract (``base_layer``, adapters keyed by name, ``merge`` /
``unmerge`` / ``get_delta_weight``, ``active_adapters``, ``disable_adapters``) so peft's generic
code works on it. Its adapter tensors are polykern's, one ``nn.ParameterDict`` per polykern
parameter (``lora_pera_A.<adapter>`` holds ``PeraLinear.lora_A``,
``lora_genlora_a_latent.<adapter>`` holds ``GenLoraLinear.genlora_a_latent``, ...): the layout
peft's own save and load code expects in every supported version. polykern's layer constructors
initialise them (so a seeded ``get_peft_model`` starts from the same adapters as
``polykern.inject_adapters``) and the math is ``polykern.reference`` on the CPU and
``polykern.ops`` (the CUDA kernels) on GPU inputs.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .modules import (AdapterLinear, GenLoraLinear, PeraLinear, compute_inputs,
                      genlora_forward, pera_forward)

# The peft versions this bridge is tested with (0.17.1 beside transformers 4.57, which peft 0.17
# needs; 0.18.1, 0.19.1, 0.20.0, 0.21.2 beside transformers 5). ``_register_custom_module`` is
# experimental: its calling convention changed in 0.19 (the layer receives the LoraConfig) and the
# state-dict code was rewritten in 0.21, so an untested version is refused rather than half working.
PEFT_MIN, PEFT_MAX = (0, 17), (0, 22)          # peft >= 0.17, < 0.22
_ALLOW_UNTESTED = "POLYKERN_PEFT_ALLOW_UNTESTED"

__all__ = ["register", "from_pretrained", "PolykernLoraLinear", "polykern_layers",
           "check_peft_version", "PEFT_MIN", "PEFT_MAX", "SPEC_FILE"]

# Written by save_pretrained beside adapter_config.json: {"method": ..., "options": {...}}.
SPEC_FILE = "polykern_adapter.json"


def _version_tuple(text: str) -> Tuple[int, ...]:
    from packaging.version import Version
    return Version(text).release


def check_peft_version(version: str, has_custom_modules: bool = True) -> None:
    """Raise ImportError unless peft ``version`` is in the tested range and has the custom-module
    API; with ``POLYKERN_PEFT_ALLOW_UNTESTED=1`` an untested version only warns."""
    supported = f"peft>={PEFT_MIN[0]}.{PEFT_MIN[1]},<{PEFT_MAX[0]}.{PEFT_MAX[1]}"
    if not has_custom_modules:
        raise ImportError(f"peft {version} has no LoraConfig._register_custom_module, which "
                          f"polykern.peft builds on; install {supported}")
    if not PEFT_MIN <= _version_tuple(version)[:2] < PEFT_MAX:
        msg = (f"polykern.peft is tested with {supported}, found peft {version}; peft's "
               "custom-module API is experimental and may have changed")
        if os.environ.get(_ALLOW_UNTESTED) != "1":
            raise ImportError(msg + f" (set {_ALLOW_UNTESTED}=1 to try anyway)")
        warnings.warn(msg)


def _import_peft():
    try:
        import peft
        from peft.tuners.lora import LoraConfig, LoraLayer
    except ImportError as e:
        raise ImportError("polykern.peft needs peft (pip install 'peft>=0.17,<0.22')") from e
    check_peft_version(peft.__version__, hasattr(LoraConfig, "_register_custom_module"))
    return peft, LoraConfig, LoraLayer


_peft, _LoraConfig, _LoraLayer = _import_peft()
from peft.tuners.tuners_utils import check_adapters_to_merge  # noqa: E402  (after the check)

_SET_ADAPTER_HAS_MODE = "inference_mode" in inspect.signature(_LoraLayer.set_adapter).parameters

# polykern parameter name -> the peft attribute (a ParameterDict keyed by adapter name) holding it.
# Each peft name starts with "lora_" and holds it once more at most, after which no "." follows:
# peft 0.17-0.20 find adapter tensors by the "lora_" prefix and insert the adapter name after it.
PEFT_NAMES: Dict[str, Dict[str, str]] = {
    "pera": {n: "lora_pera_" + n.split("_")[-1] for n in PeraLinear.adapter_parameter_names},
    "genlora": {n: "lora_" + n for n in GenLoraLinear.adapter_parameter_names},
}
_CLASSES = {"pera": PeraLinear, "genlora": GenLoraLinear}

# LoraConfig options that change LoRA's math in ways these layers do not implement.
_UNSUPPORTED = ("use_dora", "lora_bias", "fan_in_fan_out", "use_qalora", "use_alora",
                "alora_invocation_tokens", "arrow_config", "use_bdlora", "velora_config",
                "monteclora_config", "mica", "kasa_config", "lora_ga_config")


class PolykernLoraLinear(nn.Module, _LoraLayer):
    """A peft LoRA layer over an ``nn.Linear`` (``weight (out, in)``) whose adapters are PERA or
    GenLoRA: ``y = base(x) + sum over active adapters of s * (x_a A^T) B^T`` with the generated
    factors ``A (R, in)``, ``B (out, R)`` of ``polykern.reference``. ``x (..., in) -> (..., out)``.

    Built by peft through the class :func:`register` makes (one per method and options); peft calls
    ``__init__(base_layer, adapter_name, config=..., r=..., lora_alpha=..., **kwargs)``.
    """

    polykern_method: str = ""               # set on the subclasses register() makes
    polykern_options: Dict[str, Any] = {}

    adapter_layer_names = tuple(n for names in PEFT_NAMES.values() for n in names.values())
    other_param_names = _LoraLayer.other_param_names + ("polykern_config",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config=None, r: int = 0,
                 lora_alpha: float = 1, **kwargs) -> None:
        super().__init__()
        kwargs.pop("tied_adapter", None)          # only for embedding-tied layers, not ours
        _LoraLayer.__init__(self, base_layer, **kwargs)
        linear = self.get_base_layer()
        if type(linear) is not nn.Linear:
            raise TypeError(f"polykern peft layers wrap nn.Linear, got {type(linear).__name__}")
        for names in PEFT_NAMES.values():
            for peft_name in names.values():
                setattr(self, peft_name, nn.ParameterDict())
        self.polykern_config: Dict[str, Dict[str, Any]] = {}
        for name in ("use_rslora", "use_dora", "lora_bias"):   # peft 0.17's LoraLayer lacks some
            if not hasattr(self, name):
                setattr(self, name, {})
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        # A new module starts in training mode; the wrapped layer's mode is the model's.
        self.train(linear.training)

    # --- adapters -------------------------------------------------------------------------------
    def _spec_for(self, config) -> Tuple[str, Dict[str, Any]]:
        """The polykern method and options for a new adapter. peft >= 0.19 passes the adapter's
        LoraConfig (its registration says); peft 0.17 and 0.18 pass none, and only the first
        adapter's can be known (the layer's class was registered with it)."""
        if config is None:
            if self.polykern_config:
                raise NotImplementedError(
                    f"peft {_peft.__version__} does not tell a layer which LoraConfig a second "
                    "adapter comes from; adding adapters to polykern layers needs peft >= 0.19")
            return type(self).polykern_method, dict(type(self).polykern_options)
        spec = _registered_spec(config)
        if spec is None:
            raise ValueError("this layer carries polykern adapters; an adapter added to it needs "
                             "a LoraConfig registered with polykern.peft.register (plain LoRA "
                             "cannot share the layer)")
        return spec

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config=None,
                     **kwargs) -> None:
        """Add adapter ``adapter_name``: polykern's layer constructor makes its parameters (on the
        base weight's device, in its dtype); peft's options come from ``config`` (peft >= 0.19) or
        from keyword arguments (peft 0.17, 0.18)."""
        opt = (lambda k, d=None: getattr(config, k, d)) if config is not None else kwargs.get
        for name in _UNSUPPORTED:
            if opt(name, None):
                raise ValueError(f"polykern peft layers do not implement LoraConfig.{name}")
        if opt("init_lora_weights", True) is not True:
            raise ValueError("polykern peft layers use polykern's initialisation: leave "
                             "init_lora_weights=True (PERA's `init` option picks 'lora' or 'pera')")
        method, options = self._spec_for(config)
        dropout = float(opt("lora_dropout", 0.0) or 0.0)
        use_rslora = bool(opt("use_rslora", False))
        # polykern's constructor validates and initialises; its frozen weight is a throwaway copy
        # (from_linear allocates one and swaps in the base's), as in polykern.inject_adapters.
        layer: AdapterLinear = _CLASSES[method].from_linear(
            self.get_base_layer(), r=r, alpha=lora_alpha, dropout=dropout, **options)
        for name, peft_name in PEFT_NAMES[method].items():
            getattr(self, peft_name)[adapter_name] = getattr(layer, name)
        self.polykern_config[adapter_name] = layer.adapter_config()
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / (r ** 0.5 if use_rslora else r)
        self.use_rslora[adapter_name] = use_rslora
        self.use_dora[adapter_name] = False
        self.lora_bias[adapter_name] = False
        self.lora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if _SET_ADAPTER_HAS_MODE:
            inference_mode = bool(opt("inference_mode", False))
            self.set_adapter(self.active_adapters, inference_mode=inference_mode)
        else:                                     # peft 0.17
            self.set_adapter(self.active_adapters)

    def _has(self, adapter: str) -> bool:
        return adapter in self.polykern_config

    def adapter_tensors(self, adapter: str) -> List[Tensor]:
        """The adapter's parameters in polykern's order (``PeraLinear.adapter_parameter_names``
        or ``GenLoraLinear.adapter_parameter_names``)."""
        method = self.polykern_config[adapter]["method"]
        return [getattr(self, n)[adapter] for n in PEFT_NAMES[method].values()]

    def factors(self, adapter: str) -> Tuple[Tensor, Tensor]:
        """Generated factors ``A (R, in)``, ``B (out, R)`` (unscaled) of ``polykern.reference``."""
        cfg, p = self.polykern_config[adapter], self.adapter_tensors(adapter)
        if cfg["method"] == "genlora":
            return reference.genlora_factors(*p)
        A, B, h = p
        return reference.pera_expand_A(A, h, cfg["terms"]), reference.pera_expand_B(B, cfg["terms"])

    def get_delta_weight(self, adapter: str) -> Tensor:
        """``Delta W = s B A``: ``(out, in)`` in the adapter parameters' dtype, no autograd."""
        cfg, p = self.polykern_config[adapter], self.adapter_tensors(adapter)
        s = self.scaling[adapter]
        with torch.no_grad():
            if cfg["method"] == "genlora":
                return reference.genlora_delta_weight(*p, s)
            return reference.pera_delta_weight(*p, s, cfg["terms"])

    # --- merge ----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
        """Add the active (or the named) adapters' ``Delta W`` into the base weight. A non-finite
        ``Delta W`` is always refused (as ``AdapterLinear.merge``); ``safe_merge`` also checks
        the sum on a copy before writing it."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self.get_base_layer().weight
        for adapter in adapter_names:
            if not self._has(adapter):
                continue
            delta = self.get_delta_weight(adapter)
            if not torch.isfinite(delta).all():
                raise ValueError(f"adapter {adapter!r}: Delta W has NaN or inf entries; refusing "
                                 "to write it into the base weight")
            if safe_merge:
                merged = weight.data + delta.to(weight.dtype)
                if not torch.isfinite(merged).all():
                    raise ValueError(f"adapter {adapter!r}: the merged weight has NaN or inf "
                                     "entries; the base weight is left as it was")
                weight.data.copy_(merged)
            else:
                weight.data.add_(delta.to(weight.dtype))
            self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract, last merged first, the ``Delta W`` that merge() added (recomputed)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if self._has(adapter):
                weight.data.sub_(self.get_delta_weight(adapter).to(weight.dtype))

    # peft's versions look the adapter up in lora_A, which these layers leave empty.
    def scale_layer(self, scale: float) -> None:
        for adapter in self.active_adapters:
            if self._has(adapter):
                self.scaling[adapter] *= scale

    def unscale_layer(self, scale=None) -> None:
        for adapter in self.active_adapters:
            if not self._has(adapter):
                continue
            if scale is None:
                r = self.r[adapter] ** 0.5 if self.use_rslora[adapter] else self.r[adapter]
                self.scaling[adapter] = self.lora_alpha[adapter] / r
            else:
                self.scaling[adapter] /= scale

    # --- forward --------------------------------------------------------------------------------
    def _adapted_linear(self, adapter: str, x: Tensor, W: Tensor, bias: Optional[Tensor],
                        x_adapter: Optional[Tensor]) -> Tensor:
        """Base plus one adapter in one call: the CUDA op for CUDA inputs when the kernels are
        loaded, the reference otherwise (the choice ``AdapterLinear.forward`` makes)."""
        cfg, p = self.polykern_config[adapter], self.adapter_tensors(adapter)
        s = self.scaling[adapter]
        if cfg["method"] == "genlora":
            return genlora_forward(x, W, bias, *p, s, x_adapter)
        return pera_forward(x, W, bias, *p, s, cfg["terms"], x_adapter)

    def _adapter_output(self, adapter: str, x_adapter: Tensor, dtype: torch.dtype) -> Tensor:
        """One more active adapter's term ``s (x_a A^T) B^T`` alone (several active adapters)."""
        A, B = self.factors(adapter)
        return F.linear(F.linear(x_adapter, A.to(dtype)), (B * self.scaling[adapter]).to(dtype))

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """``x (..., in) -> (..., out)``."""
        if kwargs.pop("adapter_names", None) is not None:
            raise NotImplementedError("polykern peft layers do not take adapter_names (mixed "
                                      "adapter batches); use set_adapter")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if self._has(a)]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        x, W, bias = compute_inputs(x, base.weight, base.bias)  # AdapterLinear.forward's casts
        y = None
        for adapter in active:
            drop = self.lora_dropout[adapter]
            x_adapter = drop(x) if self.training and isinstance(drop, nn.Dropout) else None
            if y is None:
                y = self._adapted_linear(adapter, x, W, bias, x_adapter)
            else:
                y = y + self._adapter_output(adapter, x if x_adapter is None else x_adapter,
                                             W.dtype)
        return y

    def __repr__(self) -> str:
        return "polykern." + super().__repr__()

    def extra_repr(self) -> str:
        return ", ".join(f"{a}: {c}" for a, c in self.polykern_config.items())


def _registered_spec(config) -> Optional[Tuple[str, Dict[str, Any]]]:
    """``(method, options)`` that :func:`register` gave ``config``, or None if not registered."""
    for cls in (getattr(config, "_custom_modules", None) or {}).values():
        if isinstance(cls, type) and issubclass(cls, PolykernLoraLinear):
            return cls.polykern_method, dict(cls.polykern_options)
    return None


class _RegisteredLoraConfig(_LoraConfig):
    """A LoraConfig that :func:`register` registered (it swaps the class in): ``save_pretrained``
    also writes polykern's method and options to :data:`SPEC_FILE` beside the adapter, which
    peft's own config file has no field for."""

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        super().save_pretrained(save_directory, **kwargs)
        spec = _registered_spec(self)
        if spec is not None:
            with open(os.path.join(save_directory, SPEC_FILE), "w") as f:
                json.dump({"method": spec[0], "options": spec[1]}, f, indent=2, sort_keys=True)


def register(config, method: str = "pera", **options):
    """Make peft build polykern layers for ``config``'s target ``nn.Linear`` layers; returns
    ``config``. ``method`` is "pera", "genlora" or "lora" (PERA with ``terms="none"``);
    ``options`` are the method's own: ``terms``, ``init`` (PERA); ``num_rbf``, ``latent_dim``
    (GenLoRA). ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``rank_pattern`` and
    ``alpha_pattern`` come from ``config``; targets that are not ``nn.Linear`` get peft's own LoRA.

    peft does not save the registration; ``save_pretrained`` of a registered config writes it to
    :data:`SPEC_FILE` beside the adapter, and :func:`from_pretrained` registers and loads in one
    call. (To load with ``PeftModel.from_pretrained`` instead, register the loaded ``LoraConfig``
    again with the same method and options: a different ``terms``, ``num_rbf`` or
    ``latent_dim`` changes the parameter shapes, and loading then fails.)
    """
    if not isinstance(config, _LoraConfig):
        raise TypeError(f"register expects a peft LoraConfig, got {type(config).__name__}")
    if method == "lora":
        if options.setdefault("terms", "none") != "none":
            raise ValueError("method='lora' is PERA with terms='none'; do not pass terms")
        method = "pera"
    if method not in _CLASSES:
        raise ValueError(f"unknown adapter method {method!r}: expected 'pera', 'genlora' or "
                         "'lora'")
    for key in ("r", "alpha", "dropout", "device", "dtype", "adapter_dtype"):
        if key in options:
            raise TypeError(f"register: {key!r} is not a polykern option here (the LoraConfig's "
                            "r / lora_alpha / lora_dropout, and peft's dtype handling, apply)")
    _CLASSES[method](1, 1, r=1, **options)        # let polykern validate the options now
    cls = type(f"{_CLASSES[method].__name__}Peft", (PolykernLoraLinear,),
               {"polykern_method": method, "polykern_options": dict(options),
                "__module__": __name__})
    config._register_custom_module({nn.Linear: cls})
    if type(config) is _LoraConfig:
        config.__class__ = _RegisteredLoraConfig
    return config


def from_pretrained(base_model: nn.Module, path: str, adapter_name: str = "default", **kwargs):
    """``PeftModel.from_pretrained`` for an adapter saved from a registered config: reads the
    ``LoraConfig`` and polykern's method and options saved beside it (:data:`SPEC_FILE`),
    registers, loads. ``path`` is the local folder ``save_pretrained`` wrote; ``kwargs`` go to
    ``PeftModel.from_pretrained`` (``is_trainable``, ``autocast_adapter_dtype``, ...)."""
    spec_path = os.path.join(path, SPEC_FILE)
    if not os.path.isfile(spec_path):
        raise FileNotFoundError(
            f"{path} has no {SPEC_FILE}: it was not saved from a LoraConfig registered with "
            "polykern.peft.register (or was saved before polykern wrote that file). Register "
            "the loaded LoraConfig with the method and options it was trained with, then call "
            "PeftModel.from_pretrained(base_model, path, config=config)")
    with open(spec_path) as f:
        spec = json.load(f)
    config = register(_LoraConfig.from_pretrained(path), spec["method"], **spec["options"])
    return _peft.PeftModel.from_pretrained(base_model, path, adapter_name=adapter_name,
                                           config=config, **kwargs)


def polykern_layers(model: nn.Module) -> List[Tuple[str, PolykernLoraLinear]]:
    """``(qualified name, layer)`` for every polykern peft layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PolykernLoraLinear)]
