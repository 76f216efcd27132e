"""The adapter core's GEMM helper (csrc/lt_gemm.cpp: cuBLASLt with a plan and a timed algorithm
per shape) against float64: every operand layout it maps (row-major, transposed, sliced with a
leading dimension larger than the row), odd and degenerate shapes, with and without C. The
error bound is the one used everywhere: at most 2x torch's own matmul in the same dtype."""

import pytest
import torch

import polykern
from utils import assert_within_ref_error

pytestmark = pytest.mark.skipif(not polykern.cuda_available(),
                                reason="needs a CUDA GPU and the compiled extension")
DEV = "cuda"


def laid_out(t, layout):
    """t's values in the given memory layout."""
    if layout == "row":
        return t.contiguous()
    if layout == "col":                      # column-major: what W.t() or gY.t() look like
        return t.t().contiguous().t()
    wide = torch.full((t.shape[0], t.shape[1] + 3), float("nan"), dtype=t.dtype, device=t.device)
    wide[:, :t.shape[1]] = t                 # "sliced": row stride larger than the row
    return wide[:, :t.shape[1]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M,N,K", [(37, 53, 19), (64, 152, 136), (1, 7, 5), (300, 16, 1),
                                   (5, 1, 9)])
@pytest.mark.parametrize("lx", ["row", "col", "sliced"])
@pytest.mark.parametrize("ly", ["row", "col", "sliced"])
@pytest.mark.parametrize("lc", [None, "row", "sliced"])
def test_adapter_gemm_vs_float64(dtype, M, N, K, lx, ly, lc):
    g = torch.Generator(DEV).manual_seed(M * 1000 + N * 10 + K)
    X64 = torch.randn(M, K, device=DEV, dtype=torch.float64, generator=g)
    Y64 = torch.randn(K, N, device=DEV, dtype=torch.float64, generator=g)
    C64 = torch.randn(M, N, device=DEV, dtype=torch.float64, generator=g)
    X, Y, C = (laid_out(t.to(dtype), lay) for t, lay in ((X64, lx), (Y64, ly), (C64, lc or "row")))
    if lc is None:
        out = torch.ops.polykern._adapter_gemm(X, Y)
        same, exact = X @ Y, X.double() @ Y.double()
    else:
        out = torch.ops.polykern._adapter_gemm(X, Y, C)
        same, exact = torch.addmm(C, X, Y), torch.addmm(C.double(), X.double(), Y.double())
    assert out.shape == (M, N) and out.dtype == dtype and out.is_contiguous()
    assert torch.isfinite(out).all(), "unwritten (poisoned) or non-finite elements"
    assert_within_ref_error(out, same, exact, what=f"{dtype} {M}x{N}x{K} {lx}/{ly}/{lc}")


def test_adapter_gemm_propagates_nan_and_inf():
    X = torch.randn(33, 40, device=DEV, dtype=torch.bfloat16)
    Y = torch.randn(40, 24, device=DEV, dtype=torch.bfloat16)
    X[3, 5] = float("nan")
    Y[7, 2] = float("inf")
    out, want = torch.ops.polykern._adapter_gemm(X, Y), X @ Y
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.isinf(), want.isinf())


def test_adapter_gemm_bad_inputs():
    X = torch.randn(4, 5, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"X \(4, 5\) and Y \(6, 3\) cannot be multiplied"):
        torch.ops.polykern._adapter_gemm(X, torch.randn(6, 3, device=DEV, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="Y must be a CUDA tensor"):
        torch.ops.polykern._adapter_gemm(X, torch.randn(5, 3, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="X is BFloat16 but Y is Half"):
        torch.ops.polykern._adapter_gemm(X, torch.randn(5, 3, device=DEV, dtype=torch.half))
    with pytest.raises(RuntimeError, match=r"C must be BFloat16 of shape \(4, 3\)"):
        torch.ops.polykern._adapter_gemm(X, torch.randn(5, 3, device=DEV, dtype=torch.bfloat16),
                                         torch.randn(4, 4, device=DEV, dtype=torch.bfloat16))
