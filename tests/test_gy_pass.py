"""The fused gY pass (csrc/gy_pass.cu): gU = gY B and gB = gY^T U from one read of gY, with fp32
partial sums and one summing kernel. Checked against float64 with the suite's rule (at most 2x
the error of torch's own matmuls in the same dtype) on odd row counts, column counts that are
not multiples of the 64-wide tile, both R it takes (8, 16), sliced gY; plus which operands it takes,
determinism, NaN/inf, bad inputs. The end-to-end paths through it are in test_ops_cuda.py
(MERGE_CASES at (64, 136) with R = 16)."""

import pytest
import torch

import polykern
from utils import assert_within_ref_error

pytestmark = pytest.mark.skipif(not polykern.cuda_available(),
                                reason="needs a CUDA GPU and the compiled extension")
DEV = "cuda"
P = torch.ops.polykern


def operands(N, m, R, dtype, seed, row_stride=None):
    g = torch.Generator(DEV).manual_seed(seed)
    gy64 = torch.randn(N, m, device=DEV, dtype=torch.float64, generator=g)
    B64 = torch.randn(m, R, device=DEV, dtype=torch.float64, generator=g) / m ** 0.5
    U64 = torch.randn(N, R, device=DEV, dtype=torch.float64, generator=g)
    gy = gy64.to(dtype)
    if row_stride is not None:  # a view whose rows are longer than m (NaN in the gaps)
        wide = torch.full((N, row_stride), float("nan"), device=DEV, dtype=dtype)
        wide[:, :m] = gy
        gy = wide[:, :m]
    return gy, B64.to(dtype), U64.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,m,R", [(1, 8, 8), (37, 72, 16), (300, 200, 8), (513, 520, 16),
                                   (1000, 4096, 16), (2049, 1032, 8), (64, 64, 16),
                                   (4100, 136, 16)])
@pytest.mark.parametrize("sliced", [False, True])
def test_gy_pass_vs_float64(dtype, N, m, R, sliced):
    gy, B, U = operands(N, m, R, dtype, seed=N * 7 + m + R, row_stride=m + 8 if sliced else None)
    assert P._gy_pass_takes(gy, B, U), "the fused kernel should take these operands"
    gU, gB = P._gy_pass(gy, B, U)
    assert gU.shape == (N, R) and gB.shape == (m, R) and gU.dtype == gB.dtype == dtype
    assert torch.isfinite(gU).all() and torch.isfinite(gB).all(), "unwritten (poisoned) output"
    check(gU, gB, gy, B, U, f"{dtype} {N}x{m}x{R} sliced={sliced}")


def check(gU, gB, gy, B, U, what):
    g64, B64, U64 = gy.double(), B.double(), U.double()
    # torch in the same dtype, two summation orders (rows reversed for gB)
    same_u = [gy @ B, (gy.flip(1) @ B.flip(0))]
    same_b = [gy.t() @ U, gy.flip(0).t() @ U.flip(0)]
    assert_within_ref_error(gU, same_u, g64 @ B64, what=f"gU {what}")
    assert_within_ref_error(gB, same_b, g64.t() @ U64, what=f"gB {what}")


@pytest.mark.parametrize("N,m,R,dtype,why", [
    (64, 136, 152, torch.bfloat16, "R > 16"),
    (64, 136, 32, torch.bfloat16, "R = 32 (measured no faster than two GEMMs)"),
    (64, 136, 12, torch.bfloat16, "R not 8 or 16"),
    (64, 53, 16, torch.bfloat16, "m not a multiple of 8"),
    (64, 136, 16, torch.float32, "fp32 (exact math stays on cuBLAS)"),
])
def test_gy_pass_declines_and_falls_back(N, m, R, dtype, why):
    gy, B, U = operands(N, m, R, dtype, seed=3)
    assert not P._gy_pass_takes(gy, B, U), why
    gU, gB = P._gy_pass(gy, B, U)  # two GEMMs then
    check(gU, gB, gy, B, U, why)


def test_gy_pass_declines_misaligned_rows():
    gy, B, U = operands(40, 64, 16, torch.bfloat16, seed=5, row_stride=68)  # 136-byte rows
    assert not P._gy_pass_takes(gy, B, U)
    gy2, B2, U2 = operands(40, 64, 16, torch.bfloat16, seed=5)
    off = torch.empty(40 * 64 + 1, device=DEV, dtype=torch.bfloat16)[1:].view(40, 64)
    off.copy_(gy2)  # a 2-byte offset base pointer
    assert not P._gy_pass_takes(off, B2, U2)
    check(*P._gy_pass(off, B2, U2), off, B2, U2, "offset grad_y")


def test_gy_pass_is_deterministic():
    gy, B, U = operands(3000, 1024, 16, torch.bfloat16, seed=11)
    a, b = P._gy_pass(gy, B, U), P._gy_pass(gy, B, U)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_gy_pass_propagates_nan_and_inf():
    gy, B, U = operands(100, 128, 16, torch.bfloat16, seed=13)
    gy[5, 70] = float("nan")
    U[9, 3] = float("inf")
    gU, gB = P._gy_pass(gy, B, U)
    want_u, want_b = gy.double() @ B.double(), gy.double().t() @ U.double()
    assert torch.equal(gU.isnan(), want_u.isnan()) and torch.equal(gU.isinf(), want_u.isinf())
    assert torch.equal(gB.isnan(), want_b.isnan()) and torch.equal(gB.isinf(), want_b.isinf())


def test_gy_pass_bad_inputs():
    gy, B, U = operands(10, 16, 8, torch.bfloat16, seed=1)
    with pytest.raises(RuntimeError, match=r"grad_y \(N, m\), B \(m, R\) and U \(N, R\)"):
        P._gy_pass(gy, B[:8], U)
    with pytest.raises(RuntimeError, match="must share a dtype"):
        P._gy_pass(gy, B.half(), U)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        P._gy_pass(gy, B.cpu(), U)
