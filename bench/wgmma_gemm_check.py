"""Build the experimental wgmma GEMM (csrc/experimental/wgmma_gemm.cu, not part of the package)
with torch.utils.cpp_extension.load, check it against torch.mm and time it against torch.mm
(cuBLAS) on the base GEMM shapes of the benchmark. Plan for version 12, item 1: a base GEMM of our
own at cuBLAS's speed, into which the adapter's passes can then be fused.

    python bench/wgmma_gemm_check.py [--json out.json]

Also the fused form (C, U) = (A B^T, A Aadp^T) with Aadp (32, K): the adapter's down-projection
as one more column of tiles (not yet run on a GPU when written).

And gemm_nt_lora: (C, U) = (bf16(A B^T + U Bup^T), U = bf16(A Aadp^T)), Bup (N, 32), the adapter
layer's forward without the merged weight, in one launch (TMA-store epilogue), with an optional
bias (N,) added before the rounding (checked with and without).

And B given as Bkn (K, N) row-major (MN-major B; not yet run on a GPU when written): gemm_nn,
C = A Bkn, against torch.mm(A, Bkn), and gemm_nn_lora, C = bf16(A Bkn + U Bup^T (+ bias)), the
adapter backward's gX = gY W + gU A_gen with W itself. --ops selects the sections (nt, u, lora,
nn, nnlora), e.g.

    python bench/wgmma_gemm_check.py --variants 1 --ops nn,nnlora,lora

(from bench/, with the repository root on PYTHONPATH). A line "CHECKS BEFORE THE ERROR PATH: ..."
gives the verdict before the bad-input checks, which come last.

Every check and timing runs for each of the op's variants (its last argument, see the .cu file's
head): 0 the measured kernel (epilogue stored from registers), 1 TMA-store epilogue through
shared memory, 2 2-CTA clusters with B multicast, 3 both; 1-3 compiled, not yet run on a GPU.
One row per (variant, shape); timed rows give the ratio to torch.mm and to variant 0. A
grid_limit of 3 on one small shape makes each CTA (cluster) loop over several tiles.

Correctness: fresh random bf16 operands (never zeros), the output poisoned with NaN first (the
caching allocator's free block of the output's size filled with NaN and handed back to the op, a
probe confirming it; every element must be written), error against float64 at most 2x
torch.mm's own error against float64 (both accumulate in fp32 and round once to bf16). Timing:
CUDA events around 10 calls queued back to back behind a GPU sleep (profile_step.wall_us), median
of 15 such samples after 5 warm-up calls, each variant timed before and after torch.mm in the same
process (the better of the two kept). The
committed run 2 (h100_wgmma_gemm.txt) timed the same batches without the leading sleep."""
import argparse
import glob
import json
import os

import torch
from torch.utils.cpp_extension import load

from profile_step import wall_us  # bench/ is this script's directory

HERE = os.path.dirname(os.path.abspath(__file__))


def build():
    src = os.path.join(HERE, "..", "csrc", "experimental", "wgmma_gemm.cu")
    # the cuBLAS/cuSPARSE headers ATen includes, from torch's wheel (as setup.py does)
    nvidia = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
    load(name="polykern_wgmma_gemm", sources=[src], verbose=False, is_python_module=False,
                extra_include_paths=sorted(glob.glob(os.path.join(nvidia, "cu*", "include"))),
                extra_cuda_cflags=["-O3", "-gencode", "arch=compute_90a,code=sm_90a",
                                   "--expt-relaxed-constexpr"],
                extra_ldflags=[])
    return torch.ops.polykern_exp


def time_us(fn, reps=15, batch=10, warmup=5):
    """GPU time per call: profile_step.wall_us (`batch` calls queued back to back behind a GPU
    sleep, between two events; median over reps), after warm-up."""
    for _ in range(warmup):
        fn()
    return wall_us(fn, steps=batch, reps=reps)


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


# the op's `variant` argument (csrc/experimental/wgmma_gemm.cu's head); 1-3 compiled, not yet run
# on a GPU when this was written
VARIANTS = {0: "register epilogue", 1: "TMA-store epilogue", 2: "2-CTA cluster, B multicast",
            3: "TMA store + cluster"}


def poison(*numels):
    """Leave NaN-filled blocks of these sizes (bf16 elements) as the caching allocator's only
    free blocks of their sizes, so that the op's outputs (allocated with at::empty in the same
    order) come back NaN wherever the kernel does not write. Returns whether a probe allocation
    of each size did get a NaN block back (else the all-written check would prove nothing)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    held = [torch.full((n,), float("nan"), device="cuda", dtype=torch.bfloat16) for n in numels]
    del held
    probe = [torch.empty(n, device="cuda", dtype=torch.bfloat16) for n in numels]
    ok = all(bool(torch.isnan(p).all()) for p in probe)
    del probe
    return ok


def show(row):
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in row.items()), flush=True)


def expect_error(rows, what, fn, needle):
    """A bad call must raise a RuntimeError whose first line contains `needle`."""
    try:
        fn()
    except RuntimeError as exc:
        msg = str(exc).splitlines()[0]
        row = {"op": "error", "case": what, "msg": msg, "ok": needle in msg}
    else:
        row = {"op": "error", "case": what, "msg": "no error (WRONG)", "ok": False}
    rows.append(row)
    show(row)


def operands(shape, g, nn):
    """A (M, K) and the B operand, (K, N) row-major (Bkn) when nn else (N, K); randn bf16."""
    M, N, K = shape
    A = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
    B = torch.randn(*((K, N) if nn else (N, K)), device="cuda", dtype=torch.bfloat16, generator=g)
    return A, B, (B if nn else B.t())  # the last: B as the (K, N) factor of C = A Bkn


def check_nn(ext, rows, shapes, g, small):
    """gemm_nn: C = A Bkn, Bkn (K, N) row-major (MN-major B), against torch.mm(A, Bkn) as the
    other sections (NaN-poisoned output, error at most 2x torch's against float64); grid limits
    0 and 3 on the small shapes. Timed on the large shapes against torch.mm and against variant
    1's gemm_nt on the same B made K-major (B^T contiguous: what the MN-major layout costs)."""
    for M, N, K in shapes:
        A, Bkn, _ = operands((M, N, K), g, True)
        ref = A.double() @ Bkn.double()
        e_mm = rel_err(A @ Bkn, ref)
        large = M * N * K >= 2 ** 30
        for limit in [0] if large else [0, 3]:
            poisoned = poison(M * N)
            C = ext.gemm_nn(A, Bkn, limit)
            torch.cuda.synchronize()
            written = bool(torch.isfinite(C).all())
            e = rel_err(C, ref)
            del C
            row = {"op": "gemm_nn", "M": M, "N": N, "K": K, "grid_limit": limit,
                   "poisoned": poisoned, "all_written": written, "err": e, "err_mm": e_mm,
                   "ok": poisoned and written and e <= 2 * e_mm}
            rows.append(row)
            show(row)
        del ref
        if small or not large:
            continue
        Bnk = Bkn.t().contiguous()
        t_nn = time_us(lambda: ext.gemm_nn(A, Bkn))
        t_mm = time_us(lambda: A @ Bkn)
        t_nt = time_us(lambda: ext.gemm_nt(A, Bnk, 0, 1))
        t_nn = min(t_nn, time_us(lambda: ext.gemm_nn(A, Bkn)))
        row = {"op": "time gemm_nn", "M": M, "N": N, "K": K, "us": t_nn, "us_mm": t_mm,
               "us_nt_kmajor": t_nt, "ratio_to_mm": t_nn / t_mm, "ratio_to_nt": t_nn / t_nt,
               "tflops": 2 * M * N * K / t_nn / 1e6, "tflops_mm": 2 * M * N * K / t_mm / 1e6,
               "ok": True}
        rows.append(row)
        show(row)


def check_lora(ext, rows, shapes, g, small, nn=False):
    """gemm_nt_lora (nn False): (C, U) = (bf16(A B^T + U Bup^T + bias), U = bf16(A Aadp^T)), B
    (N, K); gemm_nn_lora (nn True): the same with B given as Bkn (K, N) row-major and Bup as
    (32, N) row-major (both MN-major), C = bf16(A Bkn + U Bup + bias) (the adapter backward's gX = gY W + gU A_gen). Every shape with bias None
    and with a bias (N,); grid limits 0, 2, 3, 5 on the small shapes (several units per CTA; with
    2 and 5 a row block's U tile and its base tiles fall on different CTAs, so producers wait on
    other CTAs' flags; at 3 on (384, 768, 640) each row block's tiles share one CTA, the own-U-tile
    case). Then timed on the large shapes against the same kernel's plain GEMM alone (gemm_nt
    variant 1 / gemm_nn) and against what a step does today without the fused kernel: for
    gemm_nt_lora merge Wm = B + Bup Aadp, then x Wm^T and x Aadp^T (three cuBLAS calls); for
    gemm_nn_lora the backward's torch.mm(gY, Wm) with the merged Wm = Bkn + Aadp^T Bup^T (kept
    from the forward, not timed) and gY @ B_gen = A @ Aadp^T (two cuBLAS calls).

    Operands: A, B randn; Aadp randn / sqrt(K) and Bup randn * sqrt(K / 32), so that U Bup^T
    (sqrt(32) * sqrt(K / 32)) is of the order of A B^T (sqrt(K)); bias randn * sqrt(K), of the
    same order (a bias added to the wrong columns, or not at all, is an O(1) relative error).
    Both outputs are poisoned with NaN first: besides unwritten elements, that also catches a
    base tile whose extra k-block read U before its U tile stored it (the NaN would propagate
    into C).

    Error bounds. U: against float64 A Aadp^T, at most 2x torch's bf16 A @ Aadp.t(). C: against
    the float64 value of A B^T + U_ours Bup^T + bias (C is defined with the rounded U, ours).
    torch's bf16 form torch.addmm(A @ B.t(), U, Bup.t()) (+ bias) rounds A B^T to bf16 before
    the addition and the sum again, ours rounds once, so a 2x bound against it would be loose;
    the bound used is 2x the error of the same definition computed by torch in fp32 (products
    and the sums in fp32 without TF32, one rounding to bf16 at the end), i.e. the error model
    ours must meet; the addmm error is reported as err_addmm."""
    dev = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    name = "gemm_nn_lora" if nn else "gemm_nt_lora"
    op = ext.gemm_nn_lora if nn else ext.gemm_nt_lora
    for M, N, K in shapes:
        A, B, Bt = operands((M, N, K), g, nn)
        Ad = (torch.randn(32, K, device=dev, generator=g) / K ** 0.5).bfloat16()
        Bu = (torch.randn(N, 32, device=dev, generator=g) * (K / 32) ** 0.5).bfloat16()
        bias = (torch.randn(N, device=dev, generator=g) * K ** 0.5).bfloat16()
        Bop = Bu.t().contiguous() if nn else Bu  # gemm_nn_lora takes Bup as (32, N), MN-major
        refU = A.double() @ Ad.double().t()
        eU_mm = rel_err(A @ Ad.t(), refU)
        base = A.double() @ Bt.double()
        large = M * N * K >= 2 ** 30
        for b in (None, bias):
            for limit in [0] if large else [0, 2, 3, 5]:
                poisoned = poison(M * N, M * 32)
                C, U = op(A, B, Ad, Bop, b, grid_limit=limit)
                torch.cuda.synchronize()
                written = bool(torch.isfinite(C).all() and torch.isfinite(U).all())
                eU = rel_err(U, refU)
                refC = base + U.double() @ Bu.double().t()
                f32 = A.float() @ Bt.float() + U.float() @ Bu.float().t()
                addmm = torch.addmm(A @ Bt, U, Bu.t())
                if b is not None:
                    refC += b.double()
                    f32 += b.float()
                    addmm += b
                eC = rel_err(C, refC)
                e_fp32 = rel_err(f32.bfloat16(), refC)
                e_addmm = rel_err(addmm, refC)
                del C, U, refC, f32, addmm
                row = {"op": name, "M": M, "N": N, "K": K, "bias": b is not None,
                       "grid_limit": limit, "poisoned": poisoned, "all_written": written,
                       "err": eC, "err_fp32": e_fp32, "err_addmm": e_addmm, "err_u": eU,
                       "err_u_mm": eU_mm,
                       "ok": poisoned and written and eC <= 2 * e_fp32 and eU <= 2 * eU_mm}
                rows.append(row)
                show(row)
        del refU, base
        if small or not large:
            continue
        # ours before and after the others, the better kept (as for gemm_nt)
        if nn:
            Wm = torch.addmm(B, Ad.t(), Bu.t())  # Bkn + Aadp^T Bup^T, merged beforehand
            gemm_alone, today = (lambda: ext.gemm_nn(A, B)), (lambda: (A @ Wm, A @ Ad.t()))
        else:
            gemm_alone = lambda: ext.gemm_nt(A, B, 0, 1)  # noqa: E731
            today = lambda: (A @ torch.addmm(B, Bu, Ad).t(), A @ Ad.t())  # noqa: E731
        t_lora = time_us(lambda: op(A, B, Ad, Bop))
        t_gemm = time_us(gemm_alone)
        t_today = time_us(today)
        t_bias = time_us(lambda: op(A, B, Ad, Bop, bias))
        t_lora = min(t_lora, time_us(lambda: op(A, B, Ad, Bop)))
        row = {"op": "time " + name, "M": M, "N": N, "K": K, "us": t_lora, "us_bias": t_bias,
               "us_gemm_alone": t_gemm, "us_today": t_today, "lora_cost_us": t_lora - t_gemm,
               "bias_cost_us": t_bias - t_lora, "ratio_to_today": t_lora / t_today, "ok": True}
        rows.append(row)
        show(row)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--small", action="store_true",
                    help="the small shapes only, no timing (for compute-sanitizer)")
    ap.add_argument("--variants", default="0,1,2,3",
                    help="comma-separated subset of the op's variants to check and time "
                         "(ratio_to_v0 is nan without 0)")
    ap.add_argument("--ops", default="nt,u,lora,nn,nnlora",
                    help="comma-separated subset of the sections: nt (gemm_nt), u (gemm_nt_u), "
                         "lora (gemm_nt_lora, always TMA-store; its timing runs variant 1's "
                         "gemm_nt as the base GEMM alone), nn (gemm_nn: B as Bkn (K, N), "
                         "MN-major), nnlora (gemm_nn_lora; timed against gemm_nn alone); "
                         "--variants applies to nt and u only")
    args = ap.parse_args()
    ops = set(args.ops.split(","))
    assert ops <= {"nt", "u", "lora", "nn", "nnlora"}, f"unknown section in {args.ops}"
    variants = [int(v) for v in args.variants.split(",")]
    assert all(v in VARIANTS for v in variants), f"unknown variant in {args.variants}"
    ext = build()
    dev = "cuda"
    rows = []
    # correctness first, on small and odd-but-legal shapes (M / 128 odd: 1 and 3, the cluster
    # variants' lone last tile), then the benchmark's shapes; every variant on every shape
    shapes = [(128, 256, 64), (256, 512, 192), (384, 768, 640), (1024, 1024, 4096),
              (8192, 4096, 4096), (8192, 14336, 4096), (8192, 4096, 14336)]
    if args.small:
        shapes = shapes[:3]
    g = torch.Generator(dev).manual_seed(0)
    alone = {}  # (M, N, K, variant) -> gemm_nt's time, for the U column's cost
    for M, N, K in shapes if "nt" in ops else []:
        A = torch.randn(M, K, device=dev, dtype=torch.bfloat16, generator=g)
        B = torch.randn(N, K, device=dev, dtype=torch.bfloat16, generator=g)
        ref = A.double() @ B.double().t()
        e_mm = rel_err(A @ B.t(), ref)
        # grid_limit 3 (2 CTAs for the cluster variants) on one small shape: several tiles per
        # CTA, the persistent loop's ring and phases wrapping across tiles
        limits = [0, 3] if (M, N, K) == (384, 768, 640) else [0]
        for v in variants:
            for limit in limits:
                poisoned = poison(M * N)
                C = ext.gemm_nt(A, B, limit, v)
                torch.cuda.synchronize()
                written = bool(torch.isfinite(C).all())
                e_fast = rel_err(C, ref)
                del C
                row = {"op": "gemm_nt", "variant": v, "M": M, "N": N, "K": K,
                       "grid_limit": limit, "poisoned": poisoned, "all_written": written,
                       "err": e_fast, "err_mm": e_mm,
                       "ok": poisoned and written and e_fast <= 2 * e_mm}
                rows.append(row)
                show(row)
        del ref
        if args.small or M * N * K < 2 ** 30:
            continue
        # timing: every variant, then torch.mm, then every variant again (the better of the two
        # kept for ours), one row per (variant, shape)
        t = {v: time_us(lambda: ext.gemm_nt(A, B, 0, v)) for v in variants}
        t_mm = time_us(lambda: A @ B.t())
        for v in variants:
            t[v] = min(t[v], time_us(lambda: ext.gemm_nt(A, B, 0, v)))
        for v in variants:
            alone[(M, N, K, v)] = t[v]
            row = {"op": "time gemm_nt", "variant": v, "name": VARIANTS[v], "M": M, "N": N,
                   "K": K, "us": t[v], "us_mm": t_mm, "ratio_to_mm": t[v] / t_mm,
                   "ratio_to_v0": t[v] / t[0] if 0 in t else float("nan"), "tflops": 2 * M * N * K / t[v] / 1e6,
                   "tflops_mm": 2 * M * N * K / t_mm / 1e6, "ok": True}
            rows.append(row)
            show(row)
    # the fused U column (kR = 32): (C, U) = (A B^T, A Aadp^T), against torch.mm for both, and
    # timed against the two cuBLAS calls it replaces and against the same variant's GEMM alone
    for M, N, K in shapes if "u" in ops else []:
        A = torch.randn(M, K, device=dev, dtype=torch.bfloat16, generator=g)
        B = torch.randn(N, K, device=dev, dtype=torch.bfloat16, generator=g)
        Ad = torch.randn(32, K, device=dev, dtype=torch.bfloat16, generator=g)
        refC, refU = A.double() @ B.double().t(), A.double() @ Ad.double().t()
        eC_mm, eU_mm = rel_err(A @ B.t(), refC), rel_err(A @ Ad.t(), refU)
        limits = [0, 3] if (M, N, K) == (384, 768, 640) else [0]
        for v in variants:
            for limit in limits:
                poisoned = poison(M * N, M * 32)
                C, U = ext.gemm_nt_u(A, B, Ad, limit, v)
                torch.cuda.synchronize()
                written = bool(torch.isfinite(C).all() and torch.isfinite(U).all())
                eC, eU = rel_err(C, refC), rel_err(U, refU)
                del C, U
                row = {"op": "gemm_nt_u", "variant": v, "M": M, "N": N, "K": K,
                       "grid_limit": limit, "poisoned": poisoned, "all_written": written,
                       "err": eC, "err_mm": eC_mm, "err_u": eU, "err_u_mm": eU_mm,
                       "ok": poisoned and written and eC <= 2 * eC_mm and eU <= 2 * eU_mm}
                rows.append(row)
                show(row)
        del refC, refU
        if args.small or M * N * K < 2 ** 30:
            continue
        t_two = time_us(lambda: (A @ B.t(), A @ Ad.t()))
        for v in variants:
            if (M, N, K, v) not in alone:  # without the nt section
                alone[(M, N, K, v)] = time_us(lambda: ext.gemm_nt(A, B, 0, v))
            t_u = time_us(lambda: ext.gemm_nt_u(A, B, Ad, 0, v))
            row = {"op": "time gemm_nt_u", "variant": v, "name": VARIANTS[v], "M": M, "N": N,
                   "K": K, "us": t_u, "us_two_mm": t_two, "us_gemm_alone": alone[(M, N, K, v)],
                   "ratio_to_two_mm": t_u / t_two, "u_cost_us": t_u - alone[(M, N, K, v)],
                   "ok": True}
            rows.append(row)
            show(row)
    if "lora" in ops:
        check_lora(ext, rows, [s for s in shapes if s != (8192, 4096, 14336)], g, args.small)
    # gemm_nn, gemm_nn_lora: every shape, (8192, 4096, 14336) included (the backward's gX of the
    # 4096 -> 14336 layer: K = 14336)
    if "nn" in ops:
        check_nn(ext, rows, shapes, g, args.small)
    if "nnlora" in ops:
        check_lora(ext, rows, shapes, g, args.small, nn=True)
    def dump():
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "rows": rows}, f, indent=1)

    # the verdict (and the json) so far, in case an error-path check below takes the process down
    dump()
    print("CHECKS BEFORE THE ERROR PATH: " +
          ("ALL OK" if all(r["ok"] for r in rows) else "SOME FAILED"), flush=True)
    # bad input gets a clear error (last: a failed check may take the process down on the device)
    x = torch.randn(256, 64, device=dev, dtype=torch.bfloat16)
    expect_error(rows, "bad shape", lambda: ext.gemm_nt(
        torch.randn(100, 64, device=dev, dtype=torch.bfloat16), x), "M % 128")
    for v in (-1, 4):
        expect_error(rows, f"variant {v}", lambda: ext.gemm_nt(x, x, 0, v), "variant")
        expect_error(rows, f"variant {v} (u)",
                     lambda: ext.gemm_nt_u(x, x, x[:32], 0, v), "variant")
    if "lora" in ops:
        a = torch.randn(256, 64, device=dev, dtype=torch.bfloat16)
        up = torch.randn(256, 32, device=dev, dtype=torch.bfloat16)
        expect_error(rows, "lora: Bup rows", lambda: ext.gemm_nt_lora(a, a, a[:32], up[:128]),
                     "Bup")
        expect_error(rows, "lora: Bup columns", lambda: ext.gemm_nt_lora(a, a, a[:32], a), "Bup")
        expect_error(rows, "lora: Aadp rows", lambda: ext.gemm_nt_lora(a, a, a[:16], up), "Aadp")
        expect_error(rows, "lora: bias size",
                     lambda: ext.gemm_nt_lora(a, a, a[:32], up, up[:128, 0].contiguous()), "bias")
    if ops & {"nn", "nnlora"}:
        a = torch.randn(256, 64, device=dev, dtype=torch.bfloat16)
        bkn = torch.randn(64, 256, device=dev, dtype=torch.bfloat16)
        up = torch.randn(256, 32, device=dev, dtype=torch.bfloat16)
        expect_error(rows, "nn: Bkn rows", lambda: ext.gemm_nn(a, bkn[:32]), "Bkn")
        expect_error(rows, "nn: Bkn stride", lambda: ext.gemm_nn(a, a.t()), "unit")
        expect_error(rows, "nnlora: bias dtype",
                     lambda: ext.gemm_nn_lora(a, bkn, a[:32], up, up[:, 0].float()), "bias")
    dump()
    print("ALL OK" if all(r["ok"] for r in rows) else "SOME FAILED", flush=True)


if __name__ == "__main__":
    main()
