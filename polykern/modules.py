"""PeraLinear and GenLoraLinear: drop-in ``nn.Linear`` replacements with a generated low-rank
update.

Both share one base (frozen weight and bias, dropout on the adapter path, scaling, merge/unmerge,
``from_linear``, ``delta_weight``); each supplies its generator: PERA's polynomial expansion of
``lora_A``/``lora_B``, GenLoRA's RBF synthesis. ``forward`` picks the path in one place: the CUDA
ops (``polykern.ops``) for CUDA inputs when the extension is loaded, the reference otherwise.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import ops, reference

__all__ = ["AdapterLinear", "PeraLinear", "GenLoraLinear", "is_conv1d", "is_wrappable"]


def compute_inputs(x: Tensor, W: Tensor, bias: Optional[Tensor]):
    """``(x, W, bias)`` in the compute dtype: under autocast the autocast dtype (cast as
    ``F.linear`` would cast them); otherwise ``x`` must already match the frozen weight, and a
    mismatch raises the ``RuntimeError`` that ``nn.Linear`` raises."""
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        return x.to(dt), W.to(dt), None if bias is None else bias.to(dt)
    if x.dtype != W.dtype:
        raise RuntimeError(f"mat1 and mat2 must have the same dtype, but got {x.dtype} "
                           f"(input) and {W.dtype} (weight)")
    return x, W, bias


def pera_forward(x: Tensor, W: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, h: Tensor,
                 scaling: float, terms: str, x_adapter: Optional[Tensor] = None) -> Tensor:
    """The PERA-adapted linear on the path that serves ``x``: the CUDA ops for CUDA inputs when
    the extension is loaded, the reference otherwise (same contract as
    ``reference.pera_linear``)."""
    fn = ops.pera_linear if x.is_cuda and ops.cuda_available() else reference.pera_linear
    return fn(x, W, bias, A, B, h, scaling, terms, x_adapter)


def genlora_forward(x: Tensor, W: Tensor, bias: Optional[Tensor], Z_A, C_A, g_A, M_A, Z_B, C_B,
                    g_B, M_B, scaling: float, x_adapter: Optional[Tensor] = None) -> Tensor:
    """The GenLoRA-adapted linear on the path that serves ``x`` (see :func:`pera_forward`)."""
    use_ops = x.is_cuda and ops.cuda_available()
    fn = ops.genlora_linear if use_ops else reference.genlora_linear
    return fn(x, W, bias, Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B, scaling, x_adapter)


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's linear, weight ``(in, out)``).
    Never imports transformers: a model can only hold a Conv1D once transformers is loaded."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and type(module) is getattr(pytorch_utils, "Conv1D", None)


def is_wrappable(module: nn.Module) -> bool:
    """Whether the adapter layers wrap ``module``: exactly an ``nn.Linear`` (a subclass may
    compute something else in its forward) or transformers' ``Conv1D``."""
    return type(module) is nn.Linear or is_conv1d(module)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {name}={value}")
    return value


class AdapterLinear(nn.Module):
    """Shared base: a frozen ``nn.Linear`` (``weight (out, in)``, ``bias (out,)``) plus a low-rank
    update ``Delta W = s * B @ A`` whose factors a subclass generates from its parameters.

    ``fan_in_fan_out=True`` holds the weight as transformers' ``Conv1D`` does, ``(in, out)``
    (peft's name for it), so the layer can share a GPT-2 weight as it is; ``linear_weight`` is
    the ``(out, in)`` view every computation uses.

    Subclasses define ``method``, ``adapter_parameter_names``, ``_config_extra()``,
    ``_factors()`` (reference generator: ``A (R, in)``, ``B (out, R)``) and ``_adapted``
    (base plus adapter on the path that serves the input).
    """

    method: str = ""
    adapter_parameter_names: Tuple[str, ...] = ()

    def __init__(self, in_features: int, out_features: int, bias: bool, r: int,
                 alpha: Optional[float], dropout: float, device, dtype,
                 fan_in_fan_out: bool = False) -> None:
        super().__init__()
        self.in_features = _positive_int("in_features", in_features)
        self.out_features = _positive_int("out_features", out_features)
        self.r = _positive_int("r", r)
        if isinstance(alpha, bool) or (alpha is not None and not isinstance(alpha, (int, float))):
            raise TypeError(f"alpha must be a number or None, got {type(alpha).__name__}")
        self.alpha = float(r if alpha is None else alpha)
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive finite number, got alpha={alpha!r}")
        self.scaling = self.alpha / self.r
        if not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got dropout={dropout!r}")
        self.dropout = float(dropout)
        self.merged = False
        self.fan_in_fan_out = bool(fan_in_fan_out)
        self._warned_merged_training = False
        factory = {"device": device, "dtype": dtype}
        shape = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, **factory), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._reset_base()

    @property
    def linear_weight(self) -> Tensor:
        """The frozen weight as ``nn.Linear`` holds it, ``(out, in)`` (a view when
        ``fan_in_fan_out``)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def _reset_base(self) -> None:
        # nn.Linear's own initialisation, so a fresh layer is a plain (frozen) linear.
        nn.init.kaiming_uniform_(self.linear_weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def reset_adapter_parameters(self) -> None:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Initialise the base and the adapter as the constructor does: torch's convention, for
        a layer built on the meta device and given memory by ``to_empty``."""
        self._reset_base()
        self.reset_adapter_parameters()

    @classmethod
    def shaped_like(cls, linear: nn.Module, **cfg) -> "AdapterLinear":
        """A new layer with the shapes, weight layout, device and dtype of ``linear`` (an
        ``nn.Linear`` or transformers' ``Conv1D``) and a weight of its own; ``linear`` is not
        touched. ``cfg`` goes to the constructor (``device="meta"`` builds a layer to check a
        config and the adapter shapes without allocating)."""
        fan_in_fan_out = is_conv1d(linear)
        if not (fan_in_fan_out or isinstance(linear, nn.Linear)):
            raise TypeError("from_linear expects an nn.Linear or transformers' Conv1D, got "
                            f"{type(linear).__name__}")
        cfg.setdefault("device", linear.weight.device)
        cfg.setdefault("dtype", linear.weight.dtype)
        out_features, in_features = linear.weight.shape
        if fan_in_fan_out:
            in_features, out_features = out_features, in_features
        return cls(in_features, out_features, bias=linear.bias is not None,
                   fan_in_fan_out=fan_in_fan_out, **cfg)

    @classmethod
    def from_linear(cls, linear: nn.Module, **cfg) -> "AdapterLinear":
        """Wrap an existing ``nn.Linear``, or transformers' ``Conv1D`` (weight ``(in, out)``,
        kept as it is with ``fan_in_fan_out=True``): the new layer shares its weight and bias
        storage (the same ``Parameter`` objects, frozen), adapter parameters are created on its
        device."""
        layer = cls.shaped_like(linear, **cfg)
        layer.train(linear.training)  # an eval-mode model stays in eval mode (no adapter dropout)
        linear.weight.requires_grad_(False)
        layer.weight = linear.weight
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
            layer.bias = linear.bias
        return layer

    # --- to be provided by the generator ---------------------------------------------------
    def _factors(self) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _config_extra(self) -> Dict:
        raise NotImplementedError

    def _adapted(self, x: Tensor, W: Tensor, bias: Optional[Tensor],
                 x_adapter: Optional[Tensor]) -> Tensor:
        """Base plus adapter through :func:`pera_forward` / :func:`genlora_forward`."""
        raise NotImplementedError

    # --- shared behaviour ------------------------------------------------------------------
    def adapter_config(self) -> Dict:
        """The keyword arguments that rebuild this adapter with ``from_linear`` (JSON-friendly)."""
        p = getattr(self, self.adapter_parameter_names[0])
        cfg = {"method": self.method, "r": self.r, "alpha": self.alpha, "dropout": self.dropout,
               "adapter_dtype": str(p.dtype).replace("torch.", "")}
        cfg.update(self._config_extra())
        return cfg

    def adapter_parameters(self):
        return [getattr(self, n) for n in self.adapter_parameter_names]

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """Delta W = s * B_hat @ A_hat: ``(out, in)`` in the adapter parameters' dtype."""
        A, B = self._factors()
        return (B * self.scaling) @ A

    @torch.no_grad()
    def merge(self) -> None:
        """Add Delta W into the frozen weight; forward then runs exactly one linear."""
        if self.merged:
            warnings.warn(f"{type(self).__name__} is already merged; merge() did nothing")
            return
        delta = self.delta_weight()
        if not torch.isfinite(delta).all():
            raise ValueError(f"{type(self).__name__}.merge(): Delta W has NaN or inf entries; "
                             "refusing to write it into the frozen weight")
        self.linear_weight.add_(delta.to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the Delta W that merge() added (recomputed from the same parameters)."""
        if not self.merged:
            warnings.warn(f"{type(self).__name__} is not merged; unmerge() did nothing")
            return
        self.linear_weight.sub_(self.delta_weight().to(self.weight.dtype))
        self.merged = False

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__} expects a Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input of shape {tuple(x.shape)} does not end "
                             f"in in_features={self.in_features}")
        if x.device != self.weight.device:
            raise ValueError(f"{type(self).__name__}: input is on {x.device} but the layer's "
                             f"weight is on {self.weight.device}")

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., in) -> (..., out)``."""
        self._check_input(x)
        if self.merged:
            if self.training and torch.is_grad_enabled() and not self._warned_merged_training:
                self._warned_merged_training = True
                warnings.warn(f"{type(self).__name__} is merged and in training mode: its "
                              "forward is one plain linear, so its adapter gets no gradient; "
                              "call unmerge() before training (warned once per layer)")
            return F.linear(x, self.linear_weight, self.bias)
        x, W, bias = compute_inputs(x, self.linear_weight, self.bias)
        x_adapter = None
        if self.dropout > 0.0 and self.training:
            x_adapter = F.dropout(x, self.dropout, True)
        return self._adapted(x, W, bias, x_adapter)

    def extra_repr(self) -> str:
        extra = ", ".join(f"{k}={v!r}" for k, v in self._config_extra().items())
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, r={self.r}, alpha={self.alpha:g}, {extra}, "
                f"dropout={self.dropout:g}, merged={self.merged}"
                + (", fan_in_fan_out=True" if self.fan_in_fan_out else ""))


def _adapter_factory(device, dtype, adapter_dtype):
    return {"device": device, "dtype": adapter_dtype if adapter_dtype is not None else dtype}


class PeraLinear(AdapterLinear):
    """PERA (arXiv 2604.11841): LoRA whose factors are expanded with square and cross terms.

    Parameters: ``lora_A (r, in)``, ``lora_B (out, r)``, ``pera_h (P,)`` in the spec's pair order
    (``reference.pera_pairs``). ``terms`` in {"full", "square", "cross"} ("none": plain LoRA).
    ``init="lora"``: A kaiming-uniform, B = 0, h = 0 (the authors' code); ``init="pera"``:
    B Gaussian (std 1/r), A = 0, h = 0. ``adapter_dtype`` (default: ``dtype``) lets the adapter
    parameters be fp32 beside a bf16/fp16 weight; the expansion then runs in fp32.
    """

    method = "pera"
    adapter_parameter_names = ("lora_A", "lora_B", "pera_h")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, r: int = 16,
                 alpha: Optional[float] = None, terms: str = "full", dropout: float = 0.0,
                 init: str = "lora", device=None, dtype=None, adapter_dtype=None,
                 fan_in_fan_out: bool = False) -> None:
        super().__init__(in_features, out_features, bias, r, alpha, dropout, device, dtype,
                         fan_in_fan_out)
        if terms not in reference.PERA_TERMS:
            raise ValueError(f"unknown PERA terms {terms!r}: expected one of "
                             f"{reference.PERA_TERMS}")
        if init not in ("lora", "pera"):
            raise ValueError(f"unknown PERA init {init!r}: expected 'lora' or 'pera'")
        self.terms, self.init = terms, init
        P = reference.pera_num_pairs(r, terms)
        f = _adapter_factory(self.weight.device, self.weight.dtype, adapter_dtype)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **f))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **f))
        self.pera_h = nn.Parameter(torch.zeros(P, **f))
        self.reset_adapter_parameters()

    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        self.pera_h.zero_()
        if self.init == "lora":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B.zero_()
        else:
            self.lora_A.zero_()
            nn.init.normal_(self.lora_B, std=1.0 / self.r)

    def _config_extra(self) -> Dict:
        return {"terms": self.terms, "init": self.init}

    def _factors(self) -> Tuple[Tensor, Tensor]:
        return (reference.pera_expand_A(self.lora_A, self.pera_h, self.terms),
                reference.pera_expand_B(self.lora_B, self.terms))

    def _adapted(self, x, W, bias, x_adapter):
        return pera_forward(x, W, bias, self.lora_A, self.lora_B, self.pera_h, self.scaling,
                            self.terms, x_adapter)


class GenLoraLinear(AdapterLinear):
    """GenLoRA (arXiv 2602.05709): factors synthesised by RBFs from one latent per matrix.

    For X in {a, b}: ``genlora_X_latent`` Z (length, d), ``genlora_X_centers`` C (K, d),
    ``genlora_X_log_gamma`` g (K,), ``genlora_a_mix`` M_A (r, K), ``genlora_b_mix`` M_B (K, r);
    ``A = M_A rbf(Z_A)^T``, ``B = rbf(Z_B) M_B`` (``reference.genlora_factors``).
    """

    method = "genlora"
    adapter_parameter_names = ("genlora_a_latent", "genlora_a_centers", "genlora_a_log_gamma",
                               "genlora_a_mix", "genlora_b_latent", "genlora_b_centers",
                               "genlora_b_log_gamma", "genlora_b_mix")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, r: int = 16,
                 num_rbf: int = 32, latent_dim: int = 1, alpha: Optional[float] = None,
                 dropout: float = 0.0, device=None, dtype=None, adapter_dtype=None,
                 fan_in_fan_out: bool = False) -> None:
        super().__init__(in_features, out_features, bias, r, alpha, dropout, device, dtype,
                         fan_in_fan_out)
        self.num_rbf = K = _positive_int("num_rbf", num_rbf)
        self.latent_dim = d = _positive_int("latent_dim", latent_dim)
        f = _adapter_factory(self.weight.device, self.weight.dtype, adapter_dtype)
        for x, length in (("a", in_features), ("b", out_features)):
            setattr(self, f"genlora_{x}_latent", nn.Parameter(torch.empty(length, d, **f)))
            setattr(self, f"genlora_{x}_centers", nn.Parameter(torch.empty(K, d, **f)))
            setattr(self, f"genlora_{x}_log_gamma", nn.Parameter(torch.empty(K, **f)))
        self.genlora_a_mix = nn.Parameter(torch.empty(r, K, **f))
        self.genlora_b_mix = nn.Parameter(torch.empty(K, r, **f))
        self.reset_adapter_parameters()

    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        """SPEC-GENLORA.md's initialisation: Delta W = 0 (M_B = 0), A's rows with the variance of
        LoRA's kaiming-uniform A (1 / (3 in))."""
        K, d = self.num_rbf, self.latent_dim
        # Drawn and measured on the CPU in float64 and only then written, so a layer on the meta
        # device initialises too (its parameters have no values to read back).
        cpu64 = {"dtype": torch.float64, "device": "cpu"}
        written = {}
        for x in ("a", "b"):
            Z = getattr(self, f"genlora_{x}_latent")
            grid = torch.linspace(-1.0, 1.0, Z.shape[0], **cpu64)
            written[f"genlora_{x}_latent"] = torch.stack(
                [grid[torch.randperm(Z.shape[0], device="cpu")] for _ in range(d)], 1)
            written[f"genlora_{x}_centers"] = (torch.linspace(-1.0, 1.0, K, **cpu64)[:, None]
                                               if d == 1 else torch.rand(K, d, **cpu64) * 2 - 1)
            written[f"genlora_{x}_log_gamma"] = torch.full(
                (K,), math.log(max(K * K / 4.0, 1e-3)), **cpu64)
        for name, value in written.items():
            getattr(self, name).copy_(value)
        # The scale is measured on the values as the parameters hold them (rounded to their dtype).
        held = {n: v.to(getattr(self, n).dtype).double() for n, v in written.items()}
        phi = reference.rbf_basis(held["genlora_a_latent"], held["genlora_a_centers"],
                                  held["genlora_a_log_gamma"])
        mean_sq = phi.square().sum(1).mean().clamp_min(1e-12)
        std = math.sqrt(1.0 / (3.0 * self.in_features * float(mean_sq)))
        self.genlora_a_mix.copy_(torch.randn(self.r, K, **cpu64) * std)
        self.genlora_b_mix.zero_()

    def _config_extra(self) -> Dict:
        return {"num_rbf": self.num_rbf, "latent_dim": self.latent_dim}

    def _factors(self) -> Tuple[Tensor, Tensor]:
        return reference.genlora_factors(*self.adapter_parameters())

    def _adapted(self, x, W, bias, x_adapter):
        return genlora_forward(x, W, bias, *self.adapter_parameters(), self.scaling, x_adapter)
