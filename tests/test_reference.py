"""The reference math against independent float64 computations: Delta W as an explicit sum of
rank-one terms (SPEC-PERA.md Eq. 9), the RBF formula written element by element (SPEC-GENLORA.md),
and torch.autograd.gradcheck."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polykern import reference as ref
from utils import assert_verbose_allclose, eps

TERMS = ("full", "square", "cross")
F64 = torch.float64


def rank_one_delta_w(A, B, h, scaling, terms):
    """Independent Delta W: s (sum_i b_i a_i^T + sum_p h_p (b_i * b_j)(a_i * a_j)^T) with Python
    loops over the pairs, enumerated from their definition (not from reference.pera_pairs)."""
    r = A.shape[0]
    dw = sum(torch.outer(B[:, i], A[i]) for i in range(r))
    p = 0
    for i in range(r):
        for j in range(i, r):
            keep = {"full": True, "square": i == j, "cross": i < j, "none": False}[terms]
            if keep:
                dw = dw + h[p] * torch.outer(B[:, i] * B[:, j], A[i] * A[j])
                p += 1
    assert p == h.numel()
    return scaling * dw


def independent_pera(x, W, bias, A, B, h, scaling, terms):
    y = x @ W.t() + x @ rank_one_delta_w(A, B, h, scaling, terms).t()
    return y + bias if bias is not None else y


def independent_rbf(Z, C, g):
    """Phi[t, k] = exp(-exp(g_k) sum_c (Z[t, c] - C[k, c])^2), one element at a time."""
    L, K = Z.shape[0], C.shape[0]
    phi = torch.empty(L, K, dtype=Z.dtype)
    for t in range(L):
        for k in range(K):
            phi[t, k] = torch.exp(-torch.exp(g[k]) * ((Z[t] - C[k]) ** 2).sum())
    return phi


def pera_params(n, m, r, terms, dtype=F64, generator=None):
    P = ref.pera_num_pairs(r, terms)
    kw = {"dtype": dtype, "generator": generator}
    return (torch.randn(r, n, **kw) / math.sqrt(n), torch.randn(m, r, **kw),
            torch.randn(P, **kw))


def genlora_params(n, m, r, K, d, dtype=F64):
    return (torch.rand(n, d, dtype=dtype) * 2 - 1, torch.rand(K, d, dtype=dtype) * 2 - 1,
            torch.randn(K, dtype=dtype) * 0.5 + 1.0, torch.randn(r, K, dtype=dtype),
            torch.rand(m, d, dtype=dtype) * 2 - 1, torch.rand(K, d, dtype=dtype) * 2 - 1,
            torch.randn(K, dtype=dtype) * 0.5 + 1.0, torch.randn(K, r, dtype=dtype))


# --------------------------------------------------------------------------------------------
# PERA
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("r", range(1, 10))
def test_pera_pairs_order_and_count(r):
    expected_full = [(i, j) for i in range(r) for j in range(i, r)]
    for terms in TERMS + ("none",):
        i, j = ref.pera_pairs(r, terms)
        got = list(zip(i.tolist(), j.tolist()))
        keep = {"full": lambda a, b: True, "square": lambda a, b: a == b,
                "cross": lambda a, b: a < b, "none": lambda a, b: False}[terms]
        assert got == [(a, b) for a, b in expected_full if keep(a, b)]
        assert len(got) == ref.pera_num_pairs(r, terms)
    assert ref.pera_num_pairs(16, "full") + 16 == 152  # R at r = 16, as the spec says


def test_pera_pairs_cached_per_device():
    assert ref.pera_pairs(7, "full", "cpu")[0] is ref.pera_pairs(7, "full", "cpu")[0]


@pytest.mark.parametrize("bad", [0, -3])
def test_pera_pairs_rejects_nonpositive_r(bad):
    with pytest.raises(ValueError, match="r must be positive"):
        ref.pera_pairs(bad, "full")


def test_pera_rejects_unknown_terms():
    with pytest.raises(ValueError, match="unknown PERA terms 'cubic'"):
        ref.pera_num_pairs(4, "cubic")


@pytest.mark.parametrize("terms", TERMS)
@pytest.mark.parametrize("r", range(1, 10))
@pytest.mark.parametrize("bias", [True, False])
def test_pera_linear_matches_rank_one_sum(terms, r, bias):
    torch.manual_seed(1000 * r + len(terms))
    n, m, s = 37, 53, 0.7
    A, B, h = pera_params(n, m, r, terms)
    W = torch.randn(m, n, dtype=F64) / math.sqrt(n)
    b = torch.randn(m, dtype=F64) if bias else None
    x = torch.randn(3, 5, n, dtype=F64)  # 3-D input
    leaves = [t.requires_grad_() for t in (x, A, B, h)]
    y = ref.pera_linear(x, W, b, A, B, h, s, terms)
    y_ind = independent_pera(x, W, b, A, B, h, s, terms)
    assert_verbose_allclose(y, y_ind, rtol=1e-12, atol=1e-12, what="forward")
    gy = torch.randn_like(y)
    g = torch.autograd.grad(y, leaves, gy, allow_unused=True)
    g_ind = torch.autograd.grad(y_ind, leaves, gy, allow_unused=True)
    for name, a, e in zip("x A B h".split(), g, g_ind):
        if e is None:  # h is empty at r = 1 for "cross"
            assert a is None or a.numel() == 0
            continue
        assert_verbose_allclose(a, e, rtol=1e-11, atol=1e-11, what=f"grad {name}")


@pytest.mark.parametrize("terms", TERMS)
def test_pera_delta_weight_and_expansions(terms):
    torch.manual_seed(3)
    A, B, h = pera_params(11, 13, 5, terms)
    dw = ref.pera_delta_weight(A, B, h, 0.5, terms)
    assert_verbose_allclose(dw, rank_one_delta_w(A, B, h, 0.5, terms), 1e-12, 1e-12, "dW")
    R = 5 + ref.pera_num_pairs(5, terms)
    assert ref.pera_expand_A(A, h, terms).shape == (R, 11)
    assert ref.pera_expand_B(B, terms).shape == (13, R)


@pytest.mark.parametrize("terms", TERMS)
def test_pera_gradcheck(terms):
    torch.manual_seed(5)
    n, m, r = 7, 6, 3
    A, B, h = pera_params(n, m, r, terms)
    W, b = torch.randn(m, n, dtype=F64), torch.randn(m, dtype=F64)
    x = torch.randn(2, 3, n, dtype=F64)
    inputs = [t.requires_grad_() for t in (x, A, B, h)]
    assert torch.autograd.gradcheck(
        lambda x, A, B, h: ref.pera_linear(x, W, b, A, B, h, 1.3, terms), inputs)


@pytest.mark.parametrize("terms", TERMS)
def test_authors_formulation_agrees(terms):
    torch.manual_seed(9)
    A, B, h = pera_params(19, 23, 6, terms)
    W = torch.randn(23, 19, dtype=F64)
    x = torch.randn(4, 19, dtype=F64)
    assert_verbose_allclose(ref.pera_linear_authors(x, W, None, A, B, h, 2.0, terms),
                            ref.pera_linear(x, W, None, A, B, h, 2.0, terms), 1e-12, 1e-12,
                            "authors vs reference")


def test_pera_h_zero_is_lora():
    torch.manual_seed(2)
    A, B, _ = pera_params(17, 9, 4, "full")
    h = torch.zeros(ref.pera_num_pairs(4, "full"), dtype=F64)
    x, W = torch.randn(5, 17, dtype=F64), torch.randn(9, 17, dtype=F64)
    lora = x @ W.t() + 0.25 * (x @ A.t()) @ B.t()
    assert_verbose_allclose(ref.pera_linear(x, W, None, A, B, h, 0.25, "full"), lora,
                            1e-12, 1e-12, "h = 0")


def err_to_scale(y, y64, y_abs):
    """||y - y64|| / ||y_abs||: the normwise error against the size of the terms that were
    summed (y_abs: the same computation on absolute values), the scale rounding errors have."""
    return (y.double() - y64).norm().item() / max(y_abs.norm().item(), 1e-300)


def _rounding_stages_bound(dtype):
    # Inputs x, W, A_hat, B_hat, the intermediate U and the output y are each rounded to the
    # compute dtype (relative error <= eps/2 each), and the adds in y = base + adapter once more:
    # 7 stages of eps/2 bound the normwise error by 3.5 eps; cancellation in the random data
    # is covered by a factor 2 -> 8 eps (fp32 accumulation adds far less).
    return 8 * eps(dtype)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), m=st.integers(1, 40), r=st.integers(1, 9),
       lead=st.lists(st.integers(0, 4), min_size=0, max_size=2),
       terms=st.sampled_from(TERMS), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**31 - 1))
def test_pera_property_dtypes(n, m, r, lead, terms, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    A, B, h = pera_params(n, m, r, terms, generator=g)
    W = torch.randn(m, n, dtype=F64, generator=g) / math.sqrt(n)
    x = torch.randn(*lead, n, dtype=F64, generator=g)
    y64 = independent_pera(x, W, None, A, B, h, 1.0, terms)
    y = ref.pera_linear(x.to(dtype), W.to(dtype), None, A.to(dtype), B.to(dtype), h.to(dtype),
                        1.0, terms)
    assert y.dtype == dtype and y.shape == (*lead, m)
    if y.numel():
        # the error relative to the size of the terms summed (the same math on absolute
        # values), not to y, which cancellation can make small (m = 1, seed 405: 1.8e-6 of
        # ||y|| in fp32 against a bound of 1.3e-6); rounding the parameters themselves is one
        # more stage per factor (A, B, h -> A_hat)
        y_abs = independent_pera(x.abs(), W.abs(), None, A.abs(), B.abs(), h.abs(), 1.0, terms)
        assert err_to_scale(y, y64, y_abs) <= _rounding_stages_bound(dtype) * math.sqrt(r + 1)


# --------------------------------------------------------------------------------------------
# GenLoRA
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 3])
def test_rbf_basis_matches_formula(d):
    torch.manual_seed(d)
    Z, C, g = torch.randn(9, d, dtype=F64), torch.randn(5, d, dtype=F64), torch.randn(5, dtype=F64)
    assert_verbose_allclose(ref.rbf_basis(Z, C, g), independent_rbf(Z, C, g), 1e-13, 1e-15,
                            "rbf")


@pytest.mark.parametrize("r,K,d", [(1, 1, 1), (3, 5, 1), (4, 7, 2), (9, 3, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_genlora_linear_matches_formula(r, K, d, bias):
    torch.manual_seed(r * 100 + K * 10 + d)
    n, m, s = 37, 53, 1.7
    params = genlora_params(n, m, r, K, d)
    Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B = params
    W = torch.randn(m, n, dtype=F64)
    b = torch.randn(m, dtype=F64) if bias else None
    x = torch.randn(2, 4, n, dtype=F64)
    leaves = [t.requires_grad_() for t in (x, *params)]
    y = ref.genlora_linear(x, W, b, *params, s)
    # Delta W from its definition: A[i, t] = sum_k M_A[i, k] Phi_A[t, k] (loops over k),
    # B[u, i] = sum_k Phi_B[u, k] M_B[k, i].
    phi_a, phi_b = independent_rbf(Z_A, C_A, g_A), independent_rbf(Z_B, C_B, g_B)
    A = sum(torch.outer(M_A[:, k], phi_a[:, k]) for k in range(K))
    B = sum(torch.outer(phi_b[:, k], M_B[k]) for k in range(K))
    y_ind = x @ W.t() + s * x @ (B @ A).t() + (b if bias else 0)
    assert_verbose_allclose(y, y_ind, 1e-11, 1e-11, "forward")
    gy = torch.randn_like(y)
    for name, a, e in zip(["x", "Z_A", "C_A", "g_A", "M_A", "Z_B", "C_B", "g_B", "M_B"],
                          torch.autograd.grad(y, leaves, gy),
                          torch.autograd.grad(y_ind, leaves, gy)):
        assert_verbose_allclose(a, e, 1e-10, 1e-10, f"grad {name}")


def test_genlora_spec_backward_formulas():
    """The spec's closed-form generator gradients (gZ, gC, g log_gamma) agree with autograd."""
    torch.manual_seed(11)
    L, K, d = 13, 6, 2
    Z, C, g = torch.randn(L, d, dtype=F64), torch.randn(K, d, dtype=F64), torch.randn(K, dtype=F64)
    gphi = torch.randn(L, K, dtype=F64)
    leaves = [t.requires_grad_() for t in (Z, C, g)]
    phi = ref.rbf_basis(Z, C, g)
    gZ, gC, gg = torch.autograd.grad(phi, leaves, gphi)
    with torch.no_grad():
        E = gphi * phi
        D = Z[:, None, :] - C[None]
        gamma = g.exp()
        assert_verbose_allclose(gZ, (E[..., None] * (-2 * gamma)[None, :, None] * D).sum(1),
                                1e-12, 1e-12, "gZ")
        assert_verbose_allclose(gC, (E[..., None] * (2 * gamma)[None, :, None] * D).sum(0),
                                1e-12, 1e-12, "gC")
        assert_verbose_allclose(gg, (E * -gamma * D.square().sum(-1)).sum(0), 1e-12, 1e-12,
                                "g log_gamma")


def test_genlora_gradcheck():
    torch.manual_seed(6)
    n, m, r, K, d = 6, 5, 2, 3, 2
    params = genlora_params(n, m, r, K, d)
    W, b = torch.randn(m, n, dtype=F64), torch.randn(m, dtype=F64)
    x = torch.randn(2, 2, n, dtype=F64)
    inputs = [t.requires_grad_() for t in (x, *params)]
    assert torch.autograd.gradcheck(
        lambda x, *p: ref.genlora_linear(x, W, b, *p, 0.9), inputs)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 30), m=st.integers(1, 30), r=st.integers(1, 8), K=st.integers(1, 12),
       d=st.integers(1, 3), N=st.integers(0, 6),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
def test_genlora_property_dtypes(n, m, r, K, d, N, dtype, seed):
    torch.manual_seed(seed)
    params = genlora_params(n, m, r, K, d)
    W = torch.randn(m, n, dtype=F64) / math.sqrt(n)
    x = torch.randn(N, n, dtype=F64)
    y64 = ref.genlora_linear(x, W, None, *params, 1.0)
    y = ref.genlora_linear(x.to(dtype), W.to(dtype), None, *(p.to(dtype) for p in params), 1.0)
    assert y.dtype == dtype and y.shape == (N, m)
    if y.numel() and y64.norm() > 0:
        # The synthesis adds exp(), a K-term sum per factor entry, each rounded (bf16: eps/2
        # each) and amplified by the exponent's magnitude |gamma ||D||^2| <= ~30 here. The
        # error is taken relative to the size of the terms summed (absolute x, W and mixes;
        # the basis values are positive), as in test_pera_property_dtypes.
        D2 = max((params[0][:, None] - params[1][None]).square().sum(-1).max().item(),
                 (params[4][:, None] - params[5][None]).square().sum(-1).max().item())
        gamma = max(params[2].exp().max().item(), params[6].exp().max().item())
        bound = _rounding_stages_bound(dtype) * (1 + gamma * D2) * math.sqrt(K)
        absp = [p.abs() if k in (3, 7) else p for k, p in enumerate(params)]
        y_abs = ref.genlora_linear(x.abs(), W.abs(), None, *absp, 1.0)
        assert err_to_scale(y, y64, y_abs) <= bound


def test_pera_pairs_match_itertools():
    # the full pair list is itertools' combinations with replacement, in the same order
    r = 6
    assert [(i, j) for i, j in itertools.combinations_with_replacement(range(r), 2)] == \
        list(zip(*[t.tolist() for t in ref.pera_pairs(r, "full")]))
