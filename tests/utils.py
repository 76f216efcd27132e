"""Shared test helpers: the tolerance rule and strided inputs (from polykern.testing), verbose
comparisons."""

from __future__ import annotations

import torch

# the checks' helpers live in the package (polykern.testing), so that the tests, users' own tests
# and `python -m polykern selftest` share one implementation
from polykern.testing import assert_within_ref_error, eps, rel_err, strided  # noqa: F401

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
