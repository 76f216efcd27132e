"""The fast path: ``torch.ops.polykern.*`` (schemas in ``csrc/polykern.cpp``, CUDA kernels in
``csrc/*.cu``), with their fake (meta) implementations and autograd formulas.

One forward op and one backward op per method, so that a training step costs two dispatches on the
host: ``pera_linear`` / ``genlora_linear`` return ``(y, U)`` with ``U = x_a A_gen^T (N, R)``
for the generated factor ``A_gen (R, in)``; ``*_linear_backward`` generates ``A_gen`` and
``B_gen (out, R)`` again from the parameters (one small launch; keeping them would hold 200 MB
over 8 Llama-3-8B-shaped layers with PERA full r = 16) and returns the input gradients and,
through the generator's chain rule, the gradients of the adapter parameters.

The entry points below pick one of three ops per call: ``*_linear_eager`` in plain eager autograd
(one C++ autograd node, ``csrc/autograd.cpp``), ``*_linear_inference`` when nothing needs a
gradient (y alone), and ``*_linear`` with the autograd formula registered here under
``torch.compile``. Under ``torch.func`` transforms and forward-mode AD, and for ranks beyond the
kernels' limits, they run the reference (``polykern.reference``), which composes with every
transform. ``set_merge_policy`` chooses how the adapter core adds the adapter's share
(``docs/DESIGN.md``).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import reference

try:  # importing _C runs the static op registrations (schemas and CUDA kernels)
    from . import _C  # noqa: F401
    _LOAD_ERROR: Optional[BaseException] = None
except ImportError as e:  # no CUDA build: the reference path serves
    _C = None
    _LOAD_ERROR = e

__all__ = ["cuda_available", "extension_loaded", "pera_linear", "genlora_linear",
           "pera_expand", "genlora_expand", "set_merge_policy", "get_merge_policy",
           "merge_policy", "PERA_MAX_RANK", "GENLORA_MAX_RANK", "GENLORA_MAX_NUM_RBF",
           "GENLORA_MAX_LATENT_DIM"]


def extension_loaded() -> bool:
    """Whether the compiled extension ``polykern._C`` imported (CUDA build present)."""
    return _C is not None


def _has_cuda_kernel(name: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"polykern::{name}", "CUDA")
    except RuntimeError:
        return False


_KERNELS = extension_loaded() and all(
    _has_cuda_kernel(n) for n in ("pera_linear", "pera_linear_backward", "genlora_linear",
                                  "genlora_linear_backward"))
from . import _build  # noqa: E402  (cuda_available's kernel-image check)


def cuda_available() -> bool:
    """Whether the CUDA ops are loaded, a GPU is present and polykern._C holds code for the
    current one (modules then use them). A GPU it holds none for (e.g. a build without its arch)
    gets the reference path and one warning naming the arch and the rebuild command
    (``polykern._build.has_kernel_image``), instead of a "no kernel image" launch failure."""
    return (_KERNELS and torch.cuda.is_available()
            and _build.has_kernel_image(torch.cuda.current_device()))


# ------------------------------------------------------------------------------------------------
# Fake implementations (shapes only), so torch.compile and opcheck can trace the ops.
# ------------------------------------------------------------------------------------------------
if extension_loaded():
    def _fake_forward(x, weight, R):
        N = math.prod(x.shape[:-1])
        return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((N, R))

    @torch.library.register_fake("polykern::pera_linear")
    def _(x, weight, bias, A, B, h, pair_i, pair_j, scaling, x_adapter):
        torch._check(x.shape[-1] == A.shape[1], lambda: "x and lora_A disagree on in_features")
        torch._check(weight.shape[1] == A.shape[1], lambda: "weight and lora_A disagree on in")
        torch._check(B.shape[0] == weight.shape[0], lambda: "lora_B and weight disagree on out")
        # R from h's (static) length, not pair_i's: under torch.compile the cached pair tensors
        # are constants whose sizes would be unbacked symbols.
        return _fake_forward(x, weight, A.shape[0] + h.shape[0])

    @torch.library.register_fake("polykern::genlora_linear")
    def _(x, weight, bias, Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B, scaling, x_adapter):
        torch._check(x.shape[-1] == Z_A.shape[0], lambda: "x and the A latent disagree on in")
        torch._check(weight.shape[0] == Z_B.shape[0], lambda: "weight and the B latent disagree")
        return _fake_forward(x, weight, M_A.shape[0])

    def _empty_like_or_none(t, needed):
        # the real kernels return contiguous tensors (or an empty one when not asked for)
        return t.new_empty(t.shape) if needed else t.new_empty((0,))

    @torch.library.register_fake("polykern::pera_linear_backward")
    def _(grad_y, x, x_adapter, weight, A, B, h, pair_i, pair_j, scaling, U, output_mask):
        gx, gxa, gp = output_mask
        return (_empty_like_or_none(x, gx),
                _empty_like_or_none(x, gxa and x_adapter is not None),
                _empty_like_or_none(A, gp), _empty_like_or_none(B, gp),
                _empty_like_or_none(h, gp))

    @torch.library.register_fake("polykern::genlora_linear_backward")
    def _(grad_y, x, x_adapter, weight, Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B, scaling, U,
          output_mask):
        gx, gxa, gp = output_mask
        return (_empty_like_or_none(x, gx),
                _empty_like_or_none(x, gxa and x_adapter is not None),
                *(_empty_like_or_none(p, gp) for p in (Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B)))

    def _fake_inference(x, weight):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("polykern::pera_linear_inference")
    def _(x, weight, bias, A, B, h, pair_i, pair_j, scaling):
        torch._check(x.shape[-1] == A.shape[1], lambda: "x and lora_A disagree on in_features")
        return _fake_inference(x, weight)

    @torch.library.register_fake("polykern::genlora_linear_inference")
    def _(x, weight, bias, Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B, scaling):
        torch._check(x.shape[-1] == Z_A.shape[0], lambda: "x and the A latent disagree on in")
        return _fake_inference(x, weight)

    @torch.library.register_fake("polykern::pera_expand")
    def _(A, B, h, pair_i, pair_j, scaling, dtype):
        R = A.shape[0] + h.shape[0]
        return A.new_empty((R, A.shape[1]), dtype=dtype), B.new_empty((B.shape[0], R), dtype=dtype)

    @torch.library.register_fake("polykern::genlora_expand")
    def _(Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B, scaling, dtype):
        return (M_A.new_empty((M_A.shape[0], Z_A.shape[0]), dtype=dtype),
                M_B.new_empty((Z_B.shape[0], M_B.shape[1]), dtype=dtype))

    # --------------------------------------------------------------------------------------------
    # Autograd: one backward op per method; frozen tensors get no gradient work.
    # --------------------------------------------------------------------------------------------
    def _base_grads(ctx, grad_y, x, weight):
        """Gradients of the frozen base (weight, bias) if a user unfroze them: plain matmuls."""
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        gW = g2.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        gb = g2.sum(0) if ctx.needs_input_grad[2] else None
        return gW, gb

    def _setup(ctx, inputs, output, n_params, scaling_idx):
        x, weight, bias = inputs[:3]
        params = inputs[3:3 + n_params]
        x_adapter = inputs[scaling_idx + 1]
        _, U = output
        ctx.mark_non_differentiable(U)  # kept for the backward, not differentiated
        ctx.scaling = inputs[scaling_idx]
        ctx.save_for_backward(x, x_adapter, weight, U, *params)

    def _mask(ctx, x_adapter, param_slice, xa_idx):
        return [bool(ctx.needs_input_grad[0]),
                bool(x_adapter is not None and ctx.needs_input_grad[xa_idx]),
                any(ctx.needs_input_grad[param_slice])]

    def _pera_setup(ctx, inputs, output):
        _setup(ctx, inputs, output, 5, 8)   # saved: A, B, h, pair_i, pair_j; scaling at 8

    def _pera_backward(ctx, grad_y, _gU):
        x, x_adapter, weight, U, A, B, h, pair_i, pair_j = ctx.saved_tensors
        gx, gxa, gA, gB, gh = torch.ops.polykern.pera_linear_backward(
            grad_y, x, x_adapter, weight, A, B, h, pair_i, pair_j, ctx.scaling, U,
            _mask(ctx, x_adapter, slice(3, 6), 9))
        gW, gb = _base_grads(ctx, grad_y, x, weight)
        n = ctx.needs_input_grad
        return (gx if n[0] else None, gW, gb, gA if n[3] else None, gB if n[4] else None,
                gh if n[5] else None, None, None, None, gxa if n[9] else None, None)

    def _genlora_setup(ctx, inputs, output):
        _setup(ctx, inputs, output, 8, 11)

    def _genlora_backward(ctx, grad_y, _gU):
        x, x_adapter, weight, U, *params = ctx.saved_tensors
        grads = torch.ops.polykern.genlora_linear_backward(
            grad_y, x, x_adapter, weight, *params, ctx.scaling, U,
            _mask(ctx, x_adapter, slice(3, 11), 12))
        gW, gb = _base_grads(ctx, grad_y, x, weight)
        n = ctx.needs_input_grad
        gparams = [g if n[3 + k] else None for k, g in enumerate(grads[2:])]
        return (grads[0] if n[0] else None, gW, gb, *gparams, None,
                grads[1] if n[12] else None, None)

    torch.library.register_autograd("polykern::pera_linear", _pera_backward,
                                    setup_context=_pera_setup)
    torch.library.register_autograd("polykern::genlora_linear", _genlora_backward,
                                    setup_context=_genlora_setup)


# ------------------------------------------------------------------------------------------------
# Options and entry points used by the modules (same signatures as the reference functions).
# ------------------------------------------------------------------------------------------------
def _option(name: str, value: int = -1) -> int:
    """A process-wide switch of the CUDA ops (``csrc/config.cpp``): sets it when ``value >= 0``
    and returns the previous value. For tests and benchmarks; users have the policies below."""
    if not extension_loaded():
        raise RuntimeError("polykern: the CUDA extension is not loaded; its options only apply "
                           "to the CUDA ops")
    return int(torch.ops.polykern._config(name, value))


@contextlib.contextmanager
def _option_set(name: str, value: int):
    """:func:`_option` for the duration of a block, then the previous value again."""
    old = _option(name, value)
    try:
        yield
    finally:
        _option(name, old)


_POLICIES = {"auto": 0, "always": 1, "never": 2}


def set_merge_policy(policy: str) -> None:
    """How the CUDA adapter core adds the adapter's share to y (forward) and gX (backward):
    ``"auto"`` (default) merges ``W + s B_gen A_gen`` into one GEMM operand when the rows N exceed
    1.5x the reduced dimension (fewer bytes than a second pass over the activation), ``"always"``
    merges, ``"never"`` accumulates ``U B_gen^T`` into y with beta = 1. Process-wide; both give
    the same result up to rounding. The merged weight lives only inside the op that builds it."""
    if policy not in _POLICIES:
        raise ValueError(f"unknown merge policy {policy!r}: expected one of {tuple(_POLICIES)}")
    _option("merge", _POLICIES[policy])


def get_merge_policy() -> str:
    """The current merge policy (see :func:`set_merge_policy`)."""
    if not extension_loaded():
        return "auto"
    code = _option("merge")
    return next(k for k, v in _POLICIES.items() if v == code)


@contextlib.contextmanager
def merge_policy(policy: str):
    """Context manager form of :func:`set_merge_policy` (restores the previous policy)."""
    old = get_merge_policy()
    set_merge_policy(policy)
    try:
        yield
    finally:
        set_merge_policy(old)


# The CUDA kernels' size limits (csrc/pera_cuda.cu kMaxRank, csrc/genlora_cuda.cu kMaxR, kMaxK,
# kMaxD); larger adapters run the reference, which takes any size.
PERA_MAX_RANK = 64
GENLORA_MAX_RANK = 128
GENLORA_MAX_NUM_RBF = 256
GENLORA_MAX_LATENT_DIM = 8
_WARNED_LIMITS = set()


def _within_limits(method: str, sizes: dict, limits: dict) -> bool:
    """Whether the CUDA kernels take these sizes; else warns once per (method, sizes)."""
    over = {k: v for k, v in sizes.items() if v > limits[k]}
    if not over:
        return True
    key = (method, tuple(sorted(sizes.items())))
    if key not in _WARNED_LIMITS:
        _WARNED_LIMITS.add(key)
        said = ", ".join(f"{k}={v} (kernel limit {limits[k]})" for k, v in over.items())
        warnings.warn(f"polykern: {method} with {said} is beyond the CUDA kernels; this layer "
                      "runs the pure-PyTorch reference (correct, slower)", stacklevel=3)
    return False


def _reference_only() -> bool:
    """A torch.func transform or forward-mode AD is active: the ops have no forward-mode formula
    and their registered autograd does not compose with functorch, so the reference serves."""
    return (torch._C._are_functorch_transforms_active()
            or torch.autograd.forward_ad._current_level >= 0)


# Eager fast path. The registered autograd above is what torch.compile, opcheck and direct
# torch.ops callers use; in plain eager mode the modules call ``*_linear_eager`` instead, which
# records one C++ autograd node (csrc/autograd.cpp) around the same forward and backward ops, and
# under no_grad ``*_linear_inference``, which computes y alone. On the H100 machine's host every
# ATen call costs about 25 us and a Python autograd.Function step as much again; below N = 8192
# that host time is a large part of the adapter's cost.
def _eager() -> bool:
    """Plain eager autograd: not tracing for torch.compile."""
    return not torch.compiler.is_compiling()


def _no_grad_needed(*tensors) -> bool:
    """Nothing asks for a gradient: inference, where U need not be computed nor kept."""
    if not torch.is_grad_enabled():
        return True
    return not any(t is not None and t.requires_grad for t in tensors)


def pera_linear(x: Tensor, W: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, h: Tensor,
                scaling: float, terms: str, x_adapter: Optional[Tensor] = None) -> Tensor:
    """CUDA PERA-adapted linear; same contract as ``reference.pera_linear``."""
    if _reference_only() or not _within_limits("PERA", {"r": A.shape[0]},
                                               {"r": PERA_MAX_RANK}):
        return reference.pera_linear(x, W, bias, A, B, h, scaling, terms, x_adapter)
    pair_i, pair_j = reference.pera_pairs(A.shape[0], terms, A.device)
    if _eager():
        if x_adapter is None and _no_grad_needed(x, W, bias, A, B, h):
            return torch.ops.polykern.pera_linear_inference.default(
                x, W, bias, A, B, h, pair_i, pair_j, float(scaling))
        return torch.ops.polykern.pera_linear_eager.default(x, W, bias, A, B, h, pair_i, pair_j,
                                                            float(scaling), x_adapter)
    return torch.ops.polykern.pera_linear(x, W, bias, A, B, h, pair_i, pair_j, float(scaling),
                                          x_adapter)[0]


def genlora_linear(x: Tensor, W: Tensor, bias: Optional[Tensor], Z_A: Tensor, C_A: Tensor,
                   g_A: Tensor, M_A: Tensor, Z_B: Tensor, C_B: Tensor, g_B: Tensor, M_B: Tensor,
                   scaling: float, x_adapter: Optional[Tensor] = None) -> Tensor:
    """CUDA GenLoRA-adapted linear; same contract as ``reference.genlora_linear``."""
    if _reference_only() or not _within_limits(
            "GenLoRA", {"r": M_A.shape[0], "num_rbf": M_A.shape[1], "latent_dim": Z_A.shape[1]},
            {"r": GENLORA_MAX_RANK, "num_rbf": GENLORA_MAX_NUM_RBF,
             "latent_dim": GENLORA_MAX_LATENT_DIM}):
        return reference.genlora_linear(x, W, bias, Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B,
                                        scaling, x_adapter)
    if _eager():
        if x_adapter is None and _no_grad_needed(x, W, bias, Z_A, C_A, g_A, M_A, Z_B, C_B, g_B,
                                                 M_B):
            return torch.ops.polykern.genlora_linear_inference.default(
                x, W, bias, Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B, float(scaling))
        return torch.ops.polykern.genlora_linear_eager.default(
            x, W, bias, Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B, float(scaling), x_adapter)
    return torch.ops.polykern.genlora_linear(x, W, bias, Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B,
                                             float(scaling), x_adapter)[0]


def pera_expand(A: Tensor, B: Tensor, h: Tensor, terms: str, scaling: float = 1.0,
                dtype: Optional[torch.dtype] = None):
    """``(A_gen (R, in), s * B_gen (out, R))`` from the CUDA generator kernel (no autograd)."""
    pair_i, pair_j = reference.pera_pairs(A.shape[0], terms, A.device)
    return torch.ops.polykern.pera_expand(A, B, h, pair_i, pair_j, float(scaling),
                                          dtype or A.dtype)


def genlora_expand(Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B, scaling: float = 1.0,
                   dtype: Optional[torch.dtype] = None):
    """``(A (r, in), s * B (out, r))`` from the CUDA RBF synthesis kernel (no autograd)."""
    return torch.ops.polykern.genlora_expand(Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B,
                                             float(scaling), dtype or M_A.dtype)
