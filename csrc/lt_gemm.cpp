// The adapter's own GEMMs (the skinny ones and the merge) on cuBLASLt, with their descriptors and
// the heuristic's algorithm kept per shape. Why not at::mm: the adapter's products write into
// buffers the caller owns (U beside the base GEMM on the side stream, the beta = 1 accumulation
// into y and gX with C aliasing D, the merge with separate C and D), which cuBLASLt does in one
// call; the plan cache makes a repeated shape cost one cublasLtMatmul. A new shape (a new token
// count N) costs its descriptors and one heuristic query: host work, no GPU timing. Timing the
// heuristic's candidates per shape class measured 0.05% end to end (bench_e2e.py, H100, 16
// workload x variant pairs) and was removed.
//
// Semantics are torch's row-major ones: D (M, N) = X (M, K) Y (K, N) + beta C, fp32
// accumulation, bf16/fp16 only (fp32 and fp64 stay on ATen with torch's TF32 settings). Split-K
// candidates may only reduce in fp32 (CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE).
#include "common.h"

#include <torch/library.h>

#ifdef POLYKERN_HAVE_CUBLASLT
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cublasLt.h>

#include <map>
#include <mutex>
#include <vector>
#endif

namespace polykern {

#ifdef POLYKERN_HAVE_CUBLASLT
namespace {

// One operand of cuBLAS's column-major problem D^T = Y^T X^T: a torch matrix T (rows, cols) that
// is row-major (stride(1) == 1) is T^T in column-major with no transpose; one that is
// column-major (stride(0) == 1, e.g. W.t()) needs CUBLAS_OP_T. Anything else is not handled.
struct Operand {
  cublasOperation_t op;
  uint64_t rows, cols;
  int64_t ld;
};

bool describe(const Tensor& t, Operand& o) {
  const int64_t r = t.size(0), c = t.size(1), s0 = t.stride(0), s1 = t.stride(1);
  if (s1 == 1 && s0 >= std::max<int64_t>(c, 1)) {
    o = {CUBLAS_OP_N, static_cast<uint64_t>(c), static_cast<uint64_t>(r), s0};
    return true;
  }
  if (s0 == 1 && s1 >= std::max<int64_t>(r, 1)) {
    o = {CUBLAS_OP_T, static_cast<uint64_t>(r), static_cast<uint64_t>(c), s1};
    return true;
  }
  return false;
}

uint32_t alignment(const Tensor& t) {
  uint32_t a = 256;
  while (a > 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % a != 0) a /= 2;
  return a;
}

struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr, ld = nullptr;
  std::vector<cublasLtMatmulHeuristicResult_t> candidates;  // the heuristic's first that fits
};

// key: device, dtype, M, N, K, both ops, four leading dimensions, C aliasing D, beta != 0 and
// the four pointers' alignments (they decide which kernels are legal).
using Key = std::array<int64_t, 17>;

constexpr size_t kMaxPlans = 4096;
std::mutex g_mutex;
std::map<Key, Plan>& plans() {
  static auto* p = new std::map<Key, Plan>();  // never destroyed: outlives the CUDA context
  return *p;
}

void destroy(Plan& p) {  // descriptors are host objects; no launch keeps them after enqueue
  if (p.ld) cublasLtMatrixLayoutDestroy(p.ld);
  if (p.lc) cublasLtMatrixLayoutDestroy(p.lc);
  if (p.lb) cublasLtMatrixLayoutDestroy(p.lb);
  if (p.la) cublasLtMatrixLayoutDestroy(p.la);
  if (p.desc) cublasLtMatmulDescDestroy(p.desc);
  p = Plan();
}

bool describe_plan(Plan& p, cudaDataType_t dt, const Operand& a, const Operand& b,
                   uint64_t n_rows, uint64_t n_cols, int64_t ldc, int64_t ldd) {
  const cublasOperation_t ta = a.op, tb = b.op;
  bool ok =
      cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)) ==
          CUBLAS_STATUS_SUCCESS &&
      cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)) ==
          CUBLAS_STATUS_SUCCESS &&
      cublasLtMatrixLayoutCreate(&p.la, dt, a.rows, a.cols, a.ld) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatrixLayoutCreate(&p.lb, dt, b.rows, b.cols, b.ld) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatrixLayoutCreate(&p.lc, dt, n_rows, n_cols, ldc) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatrixLayoutCreate(&p.ld, dt, n_rows, n_cols, ldd) == CUBLAS_STATUS_SUCCESS;
  return ok;
}

// The heuristic's candidates for a described plan (those that fit the workspace).
bool query_candidates(Plan& p, const uint32_t al[4], size_t ws_size) {
  cublasLtMatmulPreference_t pref = nullptr;
  bool ok = cublasLtMatmulPreferenceCreate(&pref) == CUBLAS_STATUS_SUCCESS;
  const uint32_t reduction = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;  // split-K sums in fp32
  ok = ok &&
       cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                            &ws_size, sizeof(ws_size)) ==
           CUBLAS_STATUS_SUCCESS &&
       cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                            &reduction, sizeof(reduction)) ==
           CUBLAS_STATUS_SUCCESS;
  const cublasLtMatmulPreferenceAttributes_t al_attr[4] = {
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
  for (int i = 0; ok && i < 4; ++i)
    ok = cublasLtMatmulPreferenceSetAttribute(pref, al_attr[i], &al[i], sizeof(al[i])) ==
         CUBLAS_STATUS_SUCCESS;
  if (ok) {
    constexpr int kMaxCandidates = 16;
    p.candidates.resize(kMaxCandidates);
    int found = 0;
    ok = cublasLtMatmulAlgoGetHeuristic(at::cuda::getCurrentCUDABlasLtHandle(), p.desc, p.la,
                                        p.lb, p.lc, p.ld, pref, kMaxCandidates,
                                        p.candidates.data(), &found) == CUBLAS_STATUS_SUCCESS;
    p.candidates.resize(ok ? found : 0);
    std::vector<cublasLtMatmulHeuristicResult_t> usable;
    for (const auto& c : p.candidates)
      if (c.state == CUBLAS_STATUS_SUCCESS && c.workspaceSize <= ws_size && usable.empty())
        usable.push_back(c);
    p.candidates.swap(usable);
  }
  if (pref) cublasLtMatmulPreferenceDestroy(pref);
  return ok && !p.candidates.empty();
}

cublasStatus_t run(const Plan& p, const void* a, const void* b, float beta,
                   const void* c, void* d, void* ws, size_t ws_size, cudaStream_t stream) {
  const float one = 1.0f;
  return cublasLtMatmul(at::cuda::getCurrentCUDABlasLtHandle(), p.desc, &one, a, p.la, b, p.lb,
                        &beta, c, p.lc, d, p.ld, &p.candidates[0].algo, ws, ws_size, stream);
}

}  // namespace

bool lt_gemm(const Tensor& X, const Tensor& Y, const Tensor& C, const Tensor& D, float beta) {
  POLYKERN_SCOPE("polykern::lt_gemm");
  const at::ScalarType st = D.scalar_type();
  cudaDataType_t dt;
  switch (st) {
    case at::kBFloat16: dt = CUDA_R_16BF; break;
    case at::kHalf: dt = CUDA_R_16F; break;
    default: return false;
  }
  if (X.dim() != 2 || Y.dim() != 2 || D.dim() != 2 || X.scalar_type() != st ||
      Y.scalar_type() != st)
    return false;
  const int64_t M = X.size(0), K = X.size(1), N = Y.size(1);
  if (M == 0 || N == 0 || K == 0 || Y.size(0) != K || D.size(0) != M || D.size(1) != N)
    return false;
  const bool has_c = beta != 0.0f;
  if (has_c && (!C.defined() || C.scalar_type() != st || C.sizes() != D.sizes())) return false;
  // D^T (N, M) = op(Y^T) op(X^T) in column-major terms; D and C must be row-major
  Operand a, b;
  if (!describe(Y, a) || !describe(X, b)) return false;
  if (D.stride(1) != 1 || D.stride(0) < std::max<int64_t>(N, 1)) return false;
  if (has_c && (C.stride(1) != 1 || C.stride(0) < std::max<int64_t>(N, 1))) return false;
  const Tensor& Cm = has_c ? C : D;
  const uint32_t al[4] = {alignment(Y), alignment(X), alignment(Cm), alignment(D)};
  const bool c_is_d = has_c && C.data_ptr() == D.data_ptr();
  const Key key = {D.get_device(), static_cast<int64_t>(st), M, N, K, a.op, b.op, a.ld, b.ld,
                   Cm.stride(0), D.stride(0), c_is_d, has_c, al[0], al[1], al[2], al[3]};

  void* ws = at::cuda::getCUDABlasLtWorkspace();
  const size_t ws_size = at::cuda::getCUDABlasLtWorkspaceSize();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = plans().find(key);
  if (it == plans().end()) {
    if (plans().size() >= kMaxPlans) {
      for (auto& kv : plans()) destroy(kv.second);
      plans().clear();
    }
    Plan p;
    // remembered with no candidates where cuBLASLt cannot take it, so the caller falls back
    if (!describe_plan(p, dt, a, b, static_cast<uint64_t>(N), static_cast<uint64_t>(M),
                       Cm.stride(0), D.stride(0)) ||
        !query_candidates(p, al, ws_size))
      destroy(p);
    it = plans().emplace(key, std::move(p)).first;
  }
  Plan& p = it->second;
  if (p.candidates.empty()) return false;
  return run(p, Y.data_ptr(), X.data_ptr(), beta, Cm.data_ptr(), D.data_ptr(), ws,
             ws_size, stream) == CUBLAS_STATUS_SUCCESS;
}

#else
bool lt_gemm(const Tensor&, const Tensor&, const Tensor&, const Tensor&, float) {
  return false;
}
#endif

// lt_gemm declines what it cannot take (dtypes other than bf16/fp16, empty or mismatched
// shapes, unsupported layouts); at::mm_out serves those, with its own error messages.
void fast_mm_into(const Tensor& D, const Tensor& X, const Tensor& Y) {
  maybe_poison(D);
  if (!lt_gemm(X, Y, Tensor(), D, 0.0f)) at::mm_out(const_cast<Tensor&>(D), X, Y);
}

Tensor fast_mm(const Tensor& X, const Tensor& Y) {
  TORCH_CHECK(X.dim() == 2 && Y.dim() == 2, "polykern: fast_mm takes 2-D operands");
  Tensor D = at::empty({X.size(0), Y.size(1)}, X.options());
  fast_mm_into(D, X, Y);
  return D;
}

void fast_addmm_(Tensor& D, const Tensor& X, const Tensor& Y) {
  if (!lt_gemm(X, Y, D, D, 1.0f)) D.addmm_(X, Y);
}

Tensor fast_addmm(const Tensor& C, const Tensor& X, const Tensor& Y) {
  if (C.dim() == 2 && X.dim() == 2 && Y.dim() == 2 && X.size(0) > 0 && Y.size(1) > 0 &&
      X.size(1) > 0 && C.size(0) == X.size(0) && C.size(1) == Y.size(1) &&
      (C.scalar_type() == at::kBFloat16 || C.scalar_type() == at::kHalf)) {
    Tensor D = at::empty({X.size(0), Y.size(1)}, C.options());
    maybe_poison(D);
    if (lt_gemm(X, Y, C, D, 1.0f)) return D;
  }
  return at::addmm(C, X, Y);
}

// polykern::_adapter_gemm: the helper above as an op, so that tests can check its layouts
// (transposed and sliced operands, odd shapes) against float64 directly.
static Tensor adapter_gemm_op(const Tensor& X, const Tensor& Y, const std::optional<Tensor>& C) {
  check_cuda(X, "X", X);
  check_cuda(Y, "Y", X);
  TORCH_CHECK(X.dim() == 2 && Y.dim() == 2 && X.size(1) == Y.size(0),
              "polykern::_adapter_gemm: X ", shape(X.sizes()), " and Y ", shape(Y.sizes()),
              " cannot be multiplied");
  TORCH_CHECK(X.scalar_type() == Y.scalar_type(), "polykern::_adapter_gemm: X is ",
              X.scalar_type(), " but Y is ", Y.scalar_type());
  if (!C.has_value()) return fast_mm(X, Y);
  check_cuda(*C, "C", X);
  TORCH_CHECK(C->dim() == 2 && C->size(0) == X.size(0) && C->size(1) == Y.size(1) &&
                  C->scalar_type() == X.scalar_type(),
              "polykern::_adapter_gemm: C must be ", X.scalar_type(), " of shape (",
              num(X.size(0)), ", ", num(Y.size(1)), "), got ", C->scalar_type(), " ",
              shape(C->sizes()));
  return fast_addmm(*C, X, Y);
}

TORCH_LIBRARY_IMPL(polykern, CUDA, m) { m.impl("_adapter_gemm", &adapter_gemm_op); }

}  // namespace polykern
