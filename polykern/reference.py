"""The math of PERA and GenLoRA in plain PyTorch: the one home of both.

Everything else in polykern (the CUDA ops, the modules, the tests) calls or compares with these
functions; nothing re-derives them. The formulas are those of ``SPEC-PERA.md`` and
``SPEC-GENLORA.md`` (kept in the repository's ``docs/``).

Shapes follow ``nn.Linear``: the frozen weight ``W`` is ``(m, n)`` = ``(out, in)``, inputs are
``(..., n)``.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PERA_TERMS",
    "pera_num_pairs",
    "pera_pairs",
    "pera_expand_A",
    "pera_expand_B",
    "pera_delta_weight",
    "pera_linear",
    "pera_linear_authors",
    "rbf_basis",
    "genlora_factors",
    "genlora_delta_weight",
    "genlora_linear",
    "adapter_linear",
]

# "none" keeps no pair: PeraLinear(terms="none") is plain LoRA of rank r (a polykern extension used
# for the LoRA baseline; the paper's variants are the other three).
PERA_TERMS = ("full", "square", "cross", "none")


def _check_terms(terms: str) -> None:
    if terms not in PERA_TERMS:
        raise ValueError(f"unknown PERA terms {terms!r}: expected one of {PERA_TERMS}")


def pera_num_pairs(r: int, terms: str) -> int:
    """Number P of pair coefficients for rank ``r`` and ``terms`` (the width is R = r + P)."""
    _check_terms(terms)
    if r <= 0:
        raise ValueError(f"r must be positive, got r={r}")
    return {"full": r * (r + 1) // 2, "square": r, "cross": r * (r - 1) // 2, "none": 0}[terms]


@functools.lru_cache(maxsize=None)
def _pairs_cpu(r: int, terms: str) -> Tuple[Tensor, Tensor]:
    i, j = torch.triu_indices(r, r)  # row-major upper triangle, i <= j: the spec's order
    keep = {"full": i <= j, "square": i == j, "cross": i < j, "none": i < 0}[terms]
    return i[keep].contiguous(), j[keep].contiguous()


@functools.lru_cache(maxsize=None)
def _pairs_on(r: int, terms: str, device: torch.device) -> Tuple[Tensor, Tensor]:
    i, j = _pairs_cpu(r, terms)
    return i.to(device), j.to(device)


def pera_pairs(r: int, terms: str, device=None) -> Tuple[Tensor, Tensor]:
    """Pair indices ``(i, j)`` (two int64 tensors of length P) in the spec's order.

    Row-major upper triangle ``(0,0), (0,1), ..., (0,r-1), (1,1), ...`` filtered by ``terms``.
    Built once per ``(r, terms, device)`` and cached, so the hot path never syncs with the host.
    """
    pera_num_pairs(r, terms)  # validates r and terms
    if device is None:
        return _pairs_cpu(r, terms)
    return _pairs_on(r, terms, torch.device(device))


def pera_expand_A(A: Tensor, h: Tensor, terms: str) -> Tensor:
    """A_hat = [a_i ; h_p (a_i * a_j)]: ``A (r, n), h (P,) -> (r + P, n)``."""
    i, j = pera_pairs(A.shape[0], terms, A.device)
    return torch.cat([A, h.unsqueeze(1) * A.index_select(0, i) * A.index_select(0, j)], dim=0)


def pera_expand_B(B: Tensor, terms: str) -> Tensor:
    """B_hat = [b_i , b_i * b_j]: ``B (m, r) -> (m, r + P)``."""
    i, j = pera_pairs(B.shape[1], terms, B.device)
    return torch.cat([B, B.index_select(1, i) * B.index_select(1, j)], dim=1)


def pera_delta_weight(A: Tensor, B: Tensor, h: Tensor, scaling: float, terms: str) -> Tensor:
    """Delta W = s B_hat A_hat: ``(m, n)``."""
    return (pera_expand_B(B, terms) * scaling) @ pera_expand_A(A, h, terms)


def adapter_linear(x: Tensor, W: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                   scaling: float, x_adapter: Optional[Tensor] = None) -> Tensor:
    """y = x W^T + bias + s (x_a A^T) B^T for generated factors ``A (R, n)``, ``B (m, R)``.

    The factors (made in the adapter parameters' dtype, fp32 in mixed-precision training) are cast
    to the frozen weight's dtype, which sets the compute dtype; under autocast ``F.linear`` casts
    everything as it would for a plain ``nn.Linear``. ``x_adapter`` is the adapter path's input
    (dropout applied), ``x`` when None.
    """
    if x_adapter is None:
        x_adapter = x
    A = A.to(W.dtype)
    B = (B * scaling).to(W.dtype)
    return F.linear(x, W, bias) + F.linear(F.linear(x_adapter, A), B)


def pera_linear(x: Tensor, W: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, h: Tensor,
                scaling: float, terms: str, x_adapter: Optional[Tensor] = None) -> Tensor:
    """PERA-adapted linear: ``x (..., n) -> (..., m)``; see :func:`adapter_linear`."""
    return adapter_linear(x, W, bias, pera_expand_A(A, h, terms), pera_expand_B(B, terms),
                          scaling, x_adapter)


def pera_linear_authors(x: Tensor, W: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                        h: Tensor, scaling: float, terms: str,
                        x_adapter: Optional[Tensor] = None) -> Tensor:
    """The authors' formulation (a benchmark baseline only): r x r outer products, a triu gather
    built on every call (with its host sync) and ``torch.cat``, then two ``F.linear``."""
    r = A.shape[0]
    mask = {"full": torch.ones(r, r, dtype=torch.bool, device=A.device).triu(),
            "square": torch.eye(r, dtype=torch.bool, device=A.device),
            "cross": torch.ones(r, r, dtype=torch.bool, device=A.device).triu(1),
            "none": torch.zeros(r, r, dtype=torch.bool, device=A.device)}[terms]
    At = A.t()                                                     # (n, r)
    outer_a = (At.unsqueeze(2) * At.unsqueeze(1))[:, mask]         # (n, P), boolean gather: sync
    A_hat = torch.cat([At, outer_a * h], dim=1).t()
    outer_b = (B.unsqueeze(2) * B.unsqueeze(1))[:, mask]           # (m, P)
    B_hat = torch.cat([B, outer_b], dim=1)
    if x_adapter is None:
        x_adapter = x
    return F.linear(x, W, bias) + F.linear(F.linear(x_adapter, A_hat.to(W.dtype)),
                                           (B_hat * scaling).to(W.dtype))


def rbf_basis(Z: Tensor, C: Tensor, log_gamma: Tensor) -> Tensor:
    """RBF features ``Phi[t, k] = exp(-exp(g_k) ||Z[t] - C[k]||^2)``: ``Z (L, d), C (K, d), g (K,)
    -> (L, K)``. The one place GenLoRA's parameterisation is defined (SPEC-GENLORA.md)."""
    D = Z.unsqueeze(1) - C.unsqueeze(0)                            # (L, K, d)
    return torch.exp(-log_gamma.exp() * D.square().sum(-1))


def genlora_factors(Z_A: Tensor, C_A: Tensor, g_A: Tensor, M_A: Tensor,
                    Z_B: Tensor, C_B: Tensor, g_B: Tensor, M_B: Tensor) -> Tuple[Tensor, Tensor]:
    """Synthesised factors ``A = M_A Phi_A^T (r, n)`` and ``B = Phi_B M_B (m, r)``."""
    A = M_A @ rbf_basis(Z_A, C_A, g_A).t()
    B = rbf_basis(Z_B, C_B, g_B) @ M_B
    return A, B


def genlora_delta_weight(Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B, scaling: float) -> Tensor:
    """Delta W = s B A: ``(m, n)``."""
    A, B = genlora_factors(Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B)
    return (B * scaling) @ A


def genlora_linear(x: Tensor, W: Tensor, bias: Optional[Tensor],
                   Z_A: Tensor, C_A: Tensor, g_A: Tensor, M_A: Tensor,
                   Z_B: Tensor, C_B: Tensor, g_B: Tensor, M_B: Tensor,
                   scaling: float, x_adapter: Optional[Tensor] = None) -> Tensor:
    """GenLoRA-adapted linear: ``x (..., n) -> (..., m)``; see :func:`adapter_linear`."""
    A, B = genlora_factors(Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B)
    return adapter_linear(x, W, bias, A, B, scaling, x_adapter)
