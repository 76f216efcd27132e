"""The fast path: ``torch.ops.polykern.*`` (schemas in ``csrc/polykern.cpp``, CUDA kernels in
``csrc/*.cu``), with their fake (meta) implementations and autograd formulas.

One forward op and one backward op per method, so that a training step costs two dispatches on the
host: ``pera_linear`` / ``genlora_linear`` return ``(y, U, A, B, W_merged)`` where
``U = x_a A^T (N, R)`` and the generated factors ``A (R, in)`` and ``B (out, R)`` (scaling folded
into B, compute dtype) are kept for the backward, and ``W_merged = W + B A`` when the caller asked
for it (``keep_merged``), the forward merged and the keep policy says keeping pays (else an empty
tensor); ``*_linear_backward`` returns the input gradients and, through the generator's chain
rule, the gradients of the adapter parameters.

The entry points below pick one of three ops per call: ``*_linear_eager`` in plain eager autograd
(one C++ autograd node, ``csrc/autograd.cpp``), ``*_linear_inference`` when nothing needs a
gradient (y alone), and ``*_linear`` with the autograd formula registered here under
``torch.compile`` and ``torch.func``. ``set_merge_policy`` chooses how the adapter core adds the
adapter's share, and whether the eager path keeps the merged weight for the backward
(``csrc/README.md``).
"""

from __future__ import annotations

import contextlib
import math
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
           "get_keep_policy", "merge_policy", "set_op_graphs", "clear_op_graphs",
           "op_graph_stats"]


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
    def _fused_gemm(N, n, m, R, x, bias):
        """adapter_core.cpp's fused_takes: the fused adapter GEMMs (no merged weight) serve
        this forward (its shape, dtype and mode rule, and an sm_90 device)."""
        return (x.device.type == "cuda"
                and torch.ops.polykern._fused_gemm_fits(N, n, m, R, x.dtype,
                                                        None if bias is None else bias.dtype)
                and torch.ops.polykern._fused_gemm_on(x.device.index or 0))

    def _fake_forward(x, weight, bias, R, x_adapter, keep_merged):
        n, m = x.shape[-1], weight.shape[0]
        N = math.prod(x.shape[:-1])
        y = x.new_empty((*x.shape[:-1], m))
        # the C++ decision itself (adapter_core.cpp); N is concrete wherever keep_merged is set
        keeps = (keep_merged and x_adapter is None
                 and torch.ops.polykern._keeps_merged(int(N), int(n), int(m))
                 and not _fused_gemm(int(N), int(n), int(m), R, x, bias))
        W_merged = x.new_empty((m, n) if keeps else (0,))
        return (y, x.new_empty((N, R)), x.new_empty((R, n)), x.new_empty((m, R)), W_merged)

    @torch.library.register_fake("polykern::pera_linear")
    def _(x, weight, bias, A, B, h, pair_i, pair_j, scaling, x_adapter, keep_merged=False):
        torch._check(x.shape[-1] == A.shape[1], lambda: "x and lora_A disagree on in_features")
        torch._check(weight.shape[1] == A.shape[1], lambda: "weight and lora_A disagree on in")
        torch._check(B.shape[0] == weight.shape[0], lambda: "lora_B and weight disagree on out")
        # R from h's (static) length, not pair_i's: under torch.compile the cached pair tensors
        # are constants whose sizes would be unbacked symbols.
        return _fake_forward(x, weight, bias, A.shape[0] + h.shape[0], x_adapter,
                             keep_merged)

    @torch.library.register_fake("polykern::genlora_linear")
    def _(x, weight, bias, Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B, scaling, x_adapter,
          keep_merged=False):
        torch._check(x.shape[-1] == Z_A.shape[0], lambda: "x and the A latent disagree on in")
        torch._check(weight.shape[0] == Z_B.shape[0], lambda: "weight and the B latent disagree")
        return _fake_forward(x, weight, bias, M_A.shape[0], x_adapter, keep_merged)

    def _empty_like_or_none(t, needed):
        # the real kernels return contiguous tensors (or an empty one when not asked for)
        return t.new_empty(t.shape) if needed else t.new_empty((0,))

    @torch.library.register_fake("polykern::pera_linear_backward")
    def _(grad_y, x, x_adapter, weight, A, B, h, pair_i, pair_j, scaling, U, A_hat, B_hat,
          output_mask, W_merged=None):
        gx, gxa, gp = output_mask
        return (_empty_like_or_none(x, gx),
                _empty_like_or_none(x, gxa and x_adapter is not None),
                _empty_like_or_none(A, gp), _empty_like_or_none(B, gp),
                _empty_like_or_none(h, gp))

    @torch.library.register_fake("polykern::genlora_linear_backward")
    def _(grad_y, x, x_adapter, weight, Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B, scaling, U, A, B,
          output_mask, W_merged=None):
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
        _, U, A_gen, B_gen, W_merged = output
        # U, the generated factors (and W_merged) are kept for the backward, not differentiated
        ctx.mark_non_differentiable(U, A_gen, B_gen, W_merged)
        ctx.scaling = inputs[scaling_idx]
        ctx.save_for_backward(x, x_adapter, weight, U, A_gen, B_gen, W_merged, *params)

    def _mask(ctx, x_adapter, param_slice, xa_idx):
        return [bool(ctx.needs_input_grad[0]),
                bool(x_adapter is not None and ctx.needs_input_grad[xa_idx]),
                any(ctx.needs_input_grad[param_slice])]

    def _kept(W_merged):
        return W_merged if W_merged.numel() > 0 else None

    def _pera_setup(ctx, inputs, output):
        _setup(ctx, inputs, output, 5, 8)   # saved: A, B, h, pair_i, pair_j; scaling at 8

    def _pera_backward(ctx, grad_y, _gU, _gA, _gB, _gW):
        x, x_adapter, weight, U, A_hat, B_hat, W_merged, A, B, h, pair_i, pair_j = \
            ctx.saved_tensors
        gx, gxa, gA, gB, gh = torch.ops.polykern.pera_linear_backward(
            grad_y, x, x_adapter, weight, A, B, h, pair_i, pair_j, ctx.scaling, U, A_hat, B_hat,
            _mask(ctx, x_adapter, slice(3, 6), 9), _kept(W_merged))
        gW, gb = _base_grads(ctx, grad_y, x, weight)
        n = ctx.needs_input_grad
        return (gx if n[0] else None, gW, gb, gA if n[3] else None, gB if n[4] else None,
                gh if n[5] else None, None, None, None, gxa if n[9] else None, None)

    def _genlora_setup(ctx, inputs, output):
        _setup(ctx, inputs, output, 8, 11)

    def _genlora_backward(ctx, grad_y, _gU, _gA, _gB, _gW):
        x, x_adapter, weight, U, A, B, W_merged, *params = ctx.saved_tensors
        grads = torch.ops.polykern.genlora_linear_backward(
            grad_y, x, x_adapter, weight, *params, ctx.scaling, U, A, B,
            _mask(ctx, x_adapter, slice(3, 11), 12), _kept(W_merged))
        gW, gb = _base_grads(ctx, grad_y, x, weight)
        n = ctx.needs_input_grad
        gparams = [g if n[3 + k] else None for k, g in enumerate(grads[2:])]
        return (grads[0] if n[0] else None, gW, gb, *gparams, None,
                grads[1] if n[12] else None, None)

    torch.library.register_autograd("polykern::pera_linear", _pera_backward,
                                    setup_context=_pera_setup)
    torch.library.register_autograd("polykern::genlora_linear", _genlora_backward,
                                    setup_context=_genlora_setup)


# Eager fast path. The registered autograd above is what torch.compile, opcheck, torch.func and
# direct torch.ops callers use; in plain eager mode the modules call ``*_linear_eager`` instead,
# which records one C++ autograd node (csrc/autograd.cpp) around the same forward and backward
# ops, and under no_grad ``*_linear_inference``, which computes y alone. On the H100 machine's
# host every ATen call costs about 25 us and a Python autograd.Function step as much again
# (bench/host_overhead.py); below N = 8192 that host time is most of the adapter's cost.
def _eager() -> bool:
    """Plain eager autograd: not tracing for torch.compile, no torch.func transform active."""
    return not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active())


# ------------------------------------------------------------------------------------------------
# Entry points used by the modules (same signatures as the reference functions).
# ------------------------------------------------------------------------------------------------
_POLICIES = {"auto": 0, "always": 1, "never": 2}


def _policy_code(policy: str, what: str) -> int:
    if policy not in _POLICIES:
        raise ValueError(f"unknown {what} policy {policy!r}: expected one of {tuple(_POLICIES)}")
    if not extension_loaded():
        raise RuntimeError(f"polykern: the CUDA extension is not loaded; the {what} policy only "
                           "applies to the CUDA ops")
    return _POLICIES[policy]


def _policy_name(code: int) -> str:
    return next(k for k, v in _POLICIES.items() if v == code)


def set_merge_policy(policy: str, keep: Optional[str] = None) -> None:
    """How the CUDA adapter core adds the adapter's share to y (forward) and gX (backward):
    ``"auto"`` (default) merges ``W + s B_hat A_hat`` into one GEMM operand when the rows N exceed
    1.5x the reduced dimension (fewer bytes than a second pass over the activation), ``"always"``
    merges, ``"never"`` accumulates ``U B_hat^T`` into y with beta = 1. Process-wide; both give
    the same result up to rounding (see csrc/README.md).

    ``keep`` (left as it is when ``None``): whether a merged training forward in eager mode keeps
    the merged weight (out_features x in_features) for the backward instead of building it again
    there, or instead of adding ``gU A_hat`` into gX with beta = 1 where the backward would not
    merge. ``"auto"`` (default) keeps it when the copy is at most half the size of the layer's
    input and output together, ``2 in out <= N (in + out)``; ``"always"`` keeps it whenever the
    forward merged; ``"never"`` rebuilds (the least memory). The adapter's gradients are the same
    bit for bit either way, and so is gX where the backward would merge too; elsewhere gX rounds
    differently (``gY W_m`` against ``gY W + gU A_hat``), both within the reference's error."""
    code = _policy_code(policy, "merge")
    keep_code = None if keep is None else _policy_code(keep, "keep")
    torch.ops.polykern.set_merge_policy(code)
    if keep_code is not None:
        torch.ops.polykern.set_keep_policy(keep_code)


def get_merge_policy() -> str:
    """The current merge policy (see :func:`set_merge_policy`)."""
    if not extension_loaded():
        return "auto"
    return _policy_name(torch.ops.polykern.get_merge_policy())


def get_keep_policy() -> str:
    """Whether merged forwards keep the merged weight (``keep`` of :func:`set_merge_policy`)."""
    if not extension_loaded():
        return "auto"
    return _policy_name(torch.ops.polykern.get_keep_policy())


@contextlib.contextmanager
def merge_policy(policy: str, keep: Optional[str] = None):
    """Context manager form of :func:`set_merge_policy` (restores the previous policies)."""
    old, old_keep = get_merge_policy(), get_keep_policy()
    set_merge_policy(policy, keep)
    try:
        yield
    finally:
        set_merge_policy(old, old_keep)


def set_op_graphs(enabled: bool, budget_mb: Optional[int] = None) -> bool:
    """Whether the CUDA ops replay their GPU work as cached CUDA graphs (on by default;
    ``POLYKERN_OP_GRAPHS=0`` at start turns it off). Returns the previous setting.

    A call whose inputs (addresses, shapes, strides, dtypes), scalars and policies match an
    earlier call is captured once and then replayed: one graph launch instead of about five GPU
    calls per op, which is what an eager step costs on the host at small N (csrc/README.md,
    version 11). A replay rewrites the memory of the outputs it returned the time before, so it
    is only taken when nothing outside polykern still holds those outputs; otherwise a second
    graph is made for the same call, or the op runs as usual. The results are the same bit for
    bit. Graphs keep their outputs' and temporaries' memory reserved until
    :func:`clear_op_graphs`; no new graphs are made once they hold ``budget_mb`` MiB together
    (default 1024, or ``POLYKERN_OP_GRAPH_MB``; ``None`` leaves it as it is)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    if budget_mb is not None and (not isinstance(budget_mb, int) or isinstance(budget_mb, bool)
                                  or budget_mb < 0):
        raise ValueError(f"budget_mb must be a non-negative int, got {budget_mb!r}")
    if not extension_loaded():
        return False
    if budget_mb is not None:
        torch.ops.polykern._set_op_graph_budget(budget_mb)
    return bool(torch.ops.polykern._set_op_graphs(int(enabled)))


def clear_op_graphs() -> None:
    """Destroy the cached op graphs (after a device synchronisation) and release their memory
    pools; tensors they returned stay valid."""
    if extension_loaded():
        torch.ops.polykern._clear_op_graphs()


def op_graph_stats() -> dict:
    """``{"graphs", "bytes", "replays", "captures"}``: the cached op graphs, the GPU memory their
    pools reserved, and the replays and captures since the process started."""
    if not extension_loaded():
        return {"graphs": 0, "bytes": 0, "replays": 0, "captures": 0}
    g, b, r, c = torch.ops.polykern._op_graph_stats()
    return {"graphs": g, "bytes": b, "replays": r, "captures": c}


def _no_grad_needed(*tensors) -> bool:
    """Nothing asks for a gradient: inference, where U need not be computed nor kept."""
    if not torch.is_grad_enabled():
        return True
    return not any(t is not None and t.requires_grad for t in tensors)


def pera_linear(x: Tensor, W: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, h: Tensor,
                scaling: float, terms: str, x_adapter: Optional[Tensor] = None) -> Tensor:
    """CUDA PERA-adapted linear; same contract as ``reference.pera_linear``."""
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
    """``(A_hat (R, in), s * B_hat (out, R))`` from the CUDA generator kernel (no autograd)."""
    pair_i, pair_j = reference.pera_pairs(A.shape[0], terms, A.device)
    return torch.ops.polykern.pera_expand(A, B, h, pair_i, pair_j, float(scaling),
                                          dtype or A.dtype)


def genlora_expand(Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B, scaling: float = 1.0,
                   dtype: Optional[torch.dtype] = None):
    """``(A (r, in), s * B (out, r))`` from the CUDA RBF synthesis kernel (no autograd)."""
    return torch.ops.polykern.genlora_expand(Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B,
                                             float(scaling), dtype or M_A.dtype)
