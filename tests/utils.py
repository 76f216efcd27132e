"""Shared test helpers: random odd shapes, dtype tolerances derived from a same-dtype reference,
verbose comparisons."""

from __future__ import annotations

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Normwise relative error ||a - ref|| / ||ref|| in float64 (inf if a has a stray NaN)."""
    a, ref = a.double(), ref.double()
    if not torch.equal(torch.isnan(a), torch.isnan(ref)):
        return float("inf")
    mask = ~torch.isnan(ref)
    den = ref[mask].norm().item()
    return (a[mask] - ref[mask]).norm().item() / max(den, 1e-300)


def assert_verbose_allclose(actual, expected, rtol, atol, what=""):
    """torch.allclose that prints where and by how much it fails."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    diff = (actual - expected).abs()
    bad = ~torch.isclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements differ (rtol={rtol}, atol={atol}); "
            f"max abs diff {diff.nan_to_num(float('inf')).max().item():.3e}, mean "
            f"{diff.nan_to_num(0).mean().item():.3e}; first bad at {idx}: "
            f"{[(actual[tuple(i)].item(), expected[tuple(i)].item()) for i in idx]}")


def assert_within_ref_error(fast, ref_same_dtype, ref64, what="", factor=2.0):
    """The fast path's error against float64 is at most ``factor`` times the error of the
    reference run in the same dtype (flash-attention's rule), plus a few ulps of slack for the
    case where the same-dtype reference happens to be exact.

    ``ref_same_dtype`` may be a list of same-dtype reference runs that differ only in the order
    of their sums (e.g. the batch rows reversed); the largest of their errors is the reference
    error. A single run can be luckily exact on an output of a few elements (a gradient of a
    handful of scalars), which makes the ratio a draw of chance rather than a property."""
    refs = ref_same_dtype if isinstance(ref_same_dtype, (list, tuple)) else [ref_same_dtype]
    e_fast = rel_err(fast, ref64)
    e_ref = max(rel_err(r, ref64) for r in refs)
    slack = 4 * eps(fast.dtype) if fast.dtype != torch.float64 else 1e-12
    assert e_fast <= factor * e_ref + slack, (
        f"{what}: fast error {e_fast:.3e} > {factor} x reference error {e_ref:.3e} + {slack:.1e}")


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous view (every other column of a wider tensor)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    wide[..., 1::2] = float("nan")  # poison: reading the gaps would show up
    view = wide[..., ::2]
    assert not view.is_contiguous() or t.shape[-1] <= 1
    return view
