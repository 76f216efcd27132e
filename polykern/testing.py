"""Checks of polykern layers against the reference, for a user's own layers and configurations.

Usable from any pytest suite (nothing here needs polykern's repository)::

    from polykern.testing import check_layer, gradcheck_layer
    def test_my_adapter():
        layer = PeraLinear(4096, 1024, r=16, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(8, 77, 4096, device="cuda", dtype=torch.bfloat16)
        check_layer(layer, x).assert_passed()
        gradcheck_layer(layer)

The rule (flash-attention's): the layer's error against float64 is at most 2x the error of the
reference (``polykern.reference``, the one home of the math) run in the same dtype on the same
inputs, for the output and every gradient. ``python -m polykern selftest`` runs these functions
over the package's own configurations; polykern's GPU tests call them too.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from . import ops, reference
from .modules import AdapterLinear, GenLoraLinear, PeraLinear

__all__ = ["eps", "rel_err", "ref_error_bound", "assert_within_ref_error", "strided",
           "randomize_adapter_", "layer_outputs", "check_layer", "LayerCheck", "gradcheck_layer",
           "opcheck_layer"]


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def rel_err(a: Tensor, ref: Tensor) -> float:
    """Normwise relative error ||a - ref|| / ||ref|| in float64 (inf if a has a stray NaN)."""
    a, ref = a.double(), ref.double()
    nan = torch.isnan(ref)
    if not torch.equal(torch.isnan(a), nan):
        return float("inf")
    if nan.any():
        a, ref = a[~nan], ref[~nan]
    return (a - ref).norm().item() / max(ref.norm().item(), 1e-300)


def ref_error_bound(fast: Tensor, ref_same_dtype, ref64: Tensor, factor: float = 2.0):
    """``(fast error, reference error, bound)`` of :func:`assert_within_ref_error`'s rule; the
    check passes when ``fast error <= bound``."""
    refs = ref_same_dtype if isinstance(ref_same_dtype, (list, tuple)) else [ref_same_dtype]
    e_fast = rel_err(fast, ref64)
    e_ref = max(rel_err(r, ref64) for r in refs)
    slack = 4 * eps(fast.dtype) if fast.dtype != torch.float64 else 1e-12
    return e_fast, e_ref, factor * e_ref + slack


def assert_within_ref_error(fast, ref_same_dtype, ref64, what="", factor=2.0):
    """The fast path's error against float64 is at most ``factor`` times the error of the
    reference run in the same dtype (flash-attention's rule), plus a few ulps of slack for the
    case where the same-dtype reference happens to be exact.

    ``ref_same_dtype`` may be a list of same-dtype reference runs that differ only in the order
    of their sums (e.g. the batch rows reversed); the largest of their errors is the reference
    error. A single run can be luckily exact on an output of a few elements (a gradient of a
    handful of scalars), which makes the ratio a draw of chance rather than a property."""
    e_fast, e_ref, bound = ref_error_bound(fast, ref_same_dtype, ref64, factor)
    assert e_fast <= bound, (
        f"{what}: fast error {e_fast:.3e} > {factor} x reference error {e_ref:.3e} "
        f"+ {bound - factor * e_ref:.1e}")


def strided(t: Tensor) -> Tensor:
    """The same values as ``t`` in a non-contiguous view (every other column of a wider tensor)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    wide[..., 1::2] = float("nan")  # poison: reading the gaps would show up
    view = wide[..., ::2]
    assert not view.is_contiguous() or t.shape[-1] <= 1
    return view


@torch.no_grad()
def randomize_adapter_(layer: AdapterLinear, seed: int = 0) -> AdapterLinear:
    """Fill the adapter parameters with random values of sensible scale (a fresh layer's Delta W
    is 0, which would make most gradient checks vacuous); in place, returns ``layer``. The values
    are drawn in float64 on the CPU from ``seed``, so they do not depend on device or dtype."""
    g = torch.Generator().manual_seed(seed)

    def randn(p, scale=1.0, shift=0.0):
        return torch.randn(p.shape, generator=g, dtype=torch.float64) * scale + shift

    for name, p in zip(layer.adapter_parameter_names, layer.adapter_parameters()):
        if name in ("lora_A", "lora_B"):
            v = randn(p, 1 / math.sqrt(p.shape[1]))
        elif name == "pera_h":
            v = randn(p, 0.5)
        elif name.endswith(("latent", "centers")):
            v = torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1
        elif name.endswith("log_gamma"):  # widths of about the centres' spacing
            v = randn(p, 0.3, 1.0)
        elif name.endswith("mix"):
            v = randn(p, 4 / math.sqrt(p.shape[0] * p.shape[1]))
        else:
            raise TypeError(f"randomize_adapter_: no scale known for parameter {name!r}")
        p.copy_(v)
    return layer


def _reference_forward(layer: AdapterLinear) -> Callable:
    """``f(x, W, bias, params) -> y``: the reference function of ``layer``'s method."""
    if isinstance(layer, PeraLinear):
        return lambda x, W, b, p: reference.pera_linear(x, W, b, *p, layer.scaling, layer.terms)
    if isinstance(layer, GenLoraLinear):
        return lambda x, W, b, p: reference.genlora_linear(x, W, b, *p, layer.scaling)
    raise TypeError(f"no reference known for {type(layer).__name__}: polykern.testing checks "
                    "PeraLinear and GenLoraLinear (and their subclasses)")


def _forward_backward(forward: Callable, x: Tensor, params: Sequence[Tensor], grad_y: Tensor,
                      reverse_rows: bool = False) -> List[Tensor]:
    """``[y, grad x, grads of the params that require grad]`` of ``forward(x, params)`` for
    the output gradient ``grad_y``. ``reverse_rows`` runs the same math on the batch rows in
    reverse order (y and grad x come back in the original order): the sums over rows then round
    differently, another sample of the dtype's error."""
    rows = tuple(range(x.dim() - 1)) if reverse_rows else ()
    xin = (x.detach().flip(rows) if rows else x.detach()).requires_grad_()
    y = forward(xin, params)
    gy = grad_y.flip(rows) if rows else grad_y  # the gradient each original row gets is unchanged
    wrt = [xin] + [p for p in params if p.requires_grad]
    grads = list(torch.autograd.grad(y, wrt, gy))
    if rows:
        y, grads[0] = y.flip(rows), grads[0].flip(rows)
    return [y] + grads


def _layer_forward(layer: AdapterLinear) -> Callable:
    """``f(x, params) -> y``: the layer's own forward with these adapter parameters, as in eval
    mode (no dropout)."""
    names = layer.adapter_parameter_names

    def forward(xin, p):
        was_training = layer.training
        layer.train(False)
        try:
            return torch.func.functional_call(layer, dict(zip(names, p)), (xin,))
        finally:
            layer.train(was_training)
    return forward


def layer_outputs(layer: AdapterLinear, x: Tensor, grad_y: Tensor, path: str,
                  reverse_rows: bool = False) -> List[Tensor]:
    """Forward and backward of ``layer`` on ``x`` (any layout) for the output gradient ``grad_y``:
    ``[y, grad x, grads of the trainable adapter parameters]``.

    ``path``: ``"layer"``, the layer's own forward (the CUDA ops for CUDA inputs when they are
    loaded, else the reference); ``"reference"``, the reference functions with the same tensors
    in the same dtypes; ``"float64"``, the reference with everything cast to float64 (``x`` as
    given, rounding and all: the exact answer to the same inputs). The layer's parameters and
    their ``.grad`` are left untouched; dropout is not applied (the layer is run as in eval
    mode: a random mask is no part of the rounding question; :func:`gradcheck_layer` covers it).
    """
    if path not in ("layer", "reference", "float64"):
        raise ValueError(f"unknown path {path!r}: expected 'layer', 'reference' or 'float64'")
    trainable = [p.requires_grad for p in layer.adapter_parameters()]
    cast = (lambda t: t.double()) if path == "float64" else (lambda t: t)
    params = [cast(p.detach()).requires_grad_(t)
              for p, t in zip(layer.adapter_parameters(), trainable)]
    x, grad_y = cast(x), cast(grad_y)
    if path == "layer":
        forward = _layer_forward(layer)
    else:
        ref = _reference_forward(layer)
        W = cast(layer.weight.detach())
        b = None if layer.bias is None else cast(layer.bias.detach())

        def forward(xin, p):
            return ref(xin, W, b, p)
    return _forward_backward(forward, x, params, grad_y, reverse_rows)


@dataclass
class LayerCheck:
    """What :func:`check_layer` found: one row per compared tensor (``y``, ``x`` for grad x,
    each trainable adapter parameter's gradient, ``y (no grad)``) with the layer's error
    against float64, the same-dtype reference's error and the bound; ``passed`` when every row
    is within it."""
    what: str
    rows: List[dict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r["passed"] for r in self.rows)

    def failures(self) -> List[dict]:
        return [r for r in self.rows if not r["passed"]]

    def summary(self) -> str:
        worst = max(self.rows, key=lambda r: r["err"] / max(r["bound"], 1e-300))
        return (f"{'ok' if self.passed else 'FAILED'}: {len(self.rows)} tensors; worst "
                f"{worst['name']}: error {worst['err']:.2e} against bound {worst['bound']:.2e} "
                f"(same-dtype reference {worst['ref_err']:.2e})")

    def assert_passed(self) -> "LayerCheck":
        if not self.passed:
            lines = [f"  {r['name']}: {r['problem'] or 'error'} {r['err']:.3e} > bound "
                     f"{r['bound']:.3e} (same-dtype reference {r['ref_err']:.3e})"
                     for r in self.failures()]
            raise AssertionError(f"{self.what}: layer outside the reference's error\n"
                                 + "\n".join(lines))
        return self

    def __bool__(self) -> bool:
        return self.passed


def check_layer(layer: AdapterLinear, x: Tensor, *, randomize: bool = True, seed: int = 0,
                factor: float = 2.0, what: Optional[str] = None) -> LayerCheck:
    """Forward and every gradient of ``layer`` on ``x`` against the reference in float64 and in
    the layer's dtype (``layer``'s device, ``x``'s layout: strided or 3-D inputs reach the layer
    as they are), and the forward under ``torch.no_grad()`` (the inference path). Passes when,
    for each tensor, the layer's error against float64 is at most ``factor`` x the larger error
    of two same-dtype reference runs (rows in order and reversed), plus 4 ulps; its output and
    gradients must also have the reference's dtype and shape and be finite where the reference
    is.

    ``randomize`` (default): check a copy whose adapter parameters are random (seeded by
    ``seed``); a fresh layer's Delta W is 0, which makes its gradients trivially right. Pass
    ``randomize=False`` to check the layer's own values (a trained adapter). The layer itself is
    never modified. Returns a :class:`LayerCheck`; ``.assert_passed()`` raises with the details.
    """
    if not isinstance(layer, AdapterLinear):
        raise TypeError(f"check_layer expects a polykern adapter layer, got "
                        f"{type(layer).__name__}")
    if layer.merged:
        raise ValueError("check_layer needs an unmerged layer (a merged one is a plain linear)")
    _reference_forward(layer)  # the TypeError for a layer without a reference, before any work
    if randomize:
        layer = randomize_adapter_(copy.deepcopy(layer), seed)
    what = what or f"{type(layer).__name__} {layer.extra_repr()} on {tuple(x.shape)} " \
                   f"{str(x.dtype).replace('torch.', '')} {x.device}"
    g = torch.Generator().manual_seed(seed + 1)
    out_shape = (*x.shape[:-1], layer.out_features)
    grad_y = torch.randn(out_shape, generator=g, dtype=torch.float64).to(x.device, x.dtype)
    fast = layer_outputs(layer, x, grad_y, "layer")
    same = list(zip(layer_outputs(layer, x, grad_y, "reference"),
                    layer_outputs(layer, x, grad_y, "reference", reverse_rows=True)))
    exact = layer_outputs(layer, x, grad_y, "float64")
    with torch.no_grad():  # the inference path (on CUDA its own op): y alone, nothing kept
        y_inference = _layer_forward(layer)(x, [p.detach() for p in layer.adapter_parameters()])
    names = ["y", "x"] + [n for n, p in zip(layer.adapter_parameter_names,
                                            layer.adapter_parameters()) if p.requires_grad]
    names.append("y (no grad)")
    fast.append(y_inference)
    same.append(same[0])
    exact.append(exact[0])
    result = LayerCheck(what)
    for name, f, s, e in zip(names, fast, same, exact):
        problem = None
        if f.dtype != s[0].dtype or f.shape != s[0].shape:
            problem = f"{f.dtype} {tuple(f.shape)} where the reference has " \
                      f"{s[0].dtype} {tuple(s[0].shape)}:"
            err, ref_err, bound = float("inf"), float("nan"), 0.0
        else:
            err, ref_err, bound = ref_error_bound(f, list(s), e, factor)
            if not torch.isfinite(f[torch.isfinite(s[0])]).all():
                problem, err = "non-finite values (an unwritten output?):", float("inf")
        result.rows.append({"name": name, "err": err, "ref_err": ref_err, "bound": bound,
                            "passed": problem is None and err <= bound, "problem": problem})
    return result


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def gradcheck_layer(layer: AdapterLinear, x: Optional[Tensor] = None, *, randomize: bool = True,
                    seed: int = 0, fast_mode: Optional[bool] = None,
                    raise_exception: bool = True) -> bool:
    """``torch.autograd.gradcheck`` of ``layer``'s forward in float64, on its device and path
    (the CUDA ops for a CUDA layer), with respect to the input and the trainable adapter
    parameters; dropout, if the layer trains with it, included (the same mask at every
    evaluation). Runs on a float64 copy (random adapter values when ``randomize``); ``x``
    defaults to a random ``(2, 3, in_features)`` input. ``fast_mode`` (gradcheck's random
    projections) is taken by default when the checked tensors have over 1024 elements together,
    where the full Jacobian would take minutes. Returns True, or raises (or returns False when
    ``raise_exception=False``)."""
    if not isinstance(layer, AdapterLinear):
        raise TypeError(f"gradcheck_layer expects a polykern adapter layer, got "
                        f"{type(layer).__name__}")
    if layer.merged:
        raise ValueError("gradcheck_layer needs an unmerged layer")
    layer64 = copy.deepcopy(layer).double()
    if randomize:
        randomize_adapter_(layer64, seed)
    device = layer64.weight.device
    if x is None:
        g = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(2, 3, layer.in_features, generator=g, dtype=torch.float64)
    x = x.detach().to(device, torch.float64).requires_grad_()
    names = [n for n, p in zip(layer64.adapter_parameter_names, layer64.adapter_parameters())
             if p.requires_grad]
    params = [getattr(layer64, n).detach().clone().requires_grad_() for n in names]

    def f(x, *p):
        with _seeded(seed + 2, device):  # the same dropout mask at every evaluation
            return torch.func.functional_call(layer64, dict(zip(names, p)), (x,))
    inputs = [x] + params
    if fast_mode is None:
        fast_mode = sum(t.numel() for t in inputs) > 1024
    return torch.autograd.gradcheck(f, inputs, fast_mode=fast_mode,
                                    raise_exception=raise_exception)


def opcheck_layer(layer: AdapterLinear, x: Tensor, all_variants: bool = True) -> None:
    """``torch.library.opcheck`` of the CUDA forward op that serves ``layer`` (schema, fake
    kernel, autograd registration, AOT dispatch) on ``x`` and the layer's own tensors; with
    ``all_variants``, also on the merged path and without gradients.
    Needs the compiled extension and CUDA tensors (the ops have no CPU kernels); float64 keeps
    the compiled and eager graphs' different GEMM algorithms within opcheck's tolerances."""
    if not ops.extension_loaded():
        raise RuntimeError("opcheck_layer needs polykern's compiled extension (polykern._C)")
    params = layer.adapter_parameters()
    x = x.detach().requires_grad_()
    if isinstance(layer, PeraLinear):
        pi, pj = reference.pera_pairs(layer.r, layer.terms, x.device)
        op = torch.ops.polykern.pera_linear.default
        args = (x, layer.weight, layer.bias, *params, pi, pj, layer.scaling, None)
    elif isinstance(layer, GenLoraLinear):
        op = torch.ops.polykern.genlora_linear.default
        args = (x, layer.weight, layer.bias, *params, layer.scaling, None)
    else:
        raise TypeError(f"no polykern op serves {type(layer).__name__}")
    torch.library.opcheck(op, args)
    if all_variants:
        with ops.merge_policy("always"):
            torch.library.opcheck(op, args)
        with torch.no_grad():
            torch.library.opcheck(op, tuple(a.detach() if isinstance(a, Tensor) else a
                                            for a in args))
